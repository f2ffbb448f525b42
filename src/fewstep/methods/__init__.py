"""Distillation methods, one file each. :data:`METHODS` is the registry: name -> class."""

from fewstep.methods.base import DistillationMethod
from fewstep.methods.consistency_distillation import ConsistencyDistillation
from fewstep.methods.progressive_distillation import ProgressiveDistillation

METHODS: dict[str, type[DistillationMethod]] = {
    cls.name: cls for cls in (ProgressiveDistillation, ConsistencyDistillation)
}

__all__ = ["METHODS", "DistillationMethod"]
