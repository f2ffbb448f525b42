"""Distillation methods, one file each. :data:`METHODS` is the registry: name -> class."""

from fewstep.methods.base import DistillationMethod
from fewstep.methods.consistency_distillation import ConsistencyDistillation
from fewstep.methods.consistency_training import ConsistencyTraining
from fewstep.methods.consistency_trajectory import ConsistencyTrajectory
from fewstep.methods.continuous_consistency import SCD, SCT
from fewstep.methods.easy_consistency_tuning import EasyConsistencyTuning
from fewstep.methods.hyper_sd import HyperSD
from fewstep.methods.improved_consistency_training import ImprovedConsistencyTraining
from fewstep.methods.latent_consistency import LatentConsistency
from fewstep.methods.phased_consistency import PhasedConsistency
from fewstep.methods.progressive_distillation import ProgressiveDistillation
from fewstep.methods.score_regularized_consistency import ScoreRegularizedConsistency
from fewstep.methods.slam import SubpathLinearApproximation
from fewstep.methods.trajectory_backward_consistency import TrajectoryBackwardConsistency

METHODS: dict[str, type[DistillationMethod]] = {
    cls.name: cls for cls in (
        ProgressiveDistillation,
        ConsistencyDistillation, ConsistencyTraining, ImprovedConsistencyTraining, EasyConsistencyTuning,
        LatentConsistency, PhasedConsistency, HyperSD, SubpathLinearApproximation,
        ConsistencyTrajectory, TrajectoryBackwardConsistency,
        SCT, SCD, ScoreRegularizedConsistency,
    )
}

__all__ = ["METHODS", "DistillationMethod"]
