"""The method protocol: what every distillation method gives the trainer, the evaluator and the exporter.

A method is a small ``nn.Module`` that owns its networks (the student, and any target network, fake
score or discriminator) and knows nothing of devices, processes or files. It declares:

* ``name``, ``family``, ``paper``, ``needs`` (which training signal it consumes, see :data:`NEEDS`);
* ``Config``: a dataclass of its hyper-parameters (validated by the CLI: unknown keys and wrong types
  are refused);
* :meth:`phases`: the parameter groups it updates and how many consecutive updates each gets per cycle
  (e.g. DMD2's fake score 5x, then the generator 1x);
* :meth:`losses`: a dict of scalar tensors for one phase on one batch; ``"loss"`` is minimised, the rest
  are logged;
* :meth:`after_update`: bookkeeping after an optimizer step (EMA targets, stage changes); returns True
  when the optimizer state must be reset (a new stage, e.g. a progressive-distillation round);
* :meth:`sampling`: how its student samples at a given NFE, as data (sampler name and noise levels), so
  an exported student is self-describing;
* ``fsdp_refusal``: None, or why it cannot train with sharded weights (``train.distributed=fsdp`` then
  stops with that reason). Sharding needs every network called through its ``forward``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from fewstep.models.denoiser import Denoiser, EDMDenoiser

NEEDS = {
    "data": "real training samples x0 (with labels when conditional)",
    "teacher_pairs": "(noise, teacher ODE endpoint) pairs, generated once and cached",
    "noise": "nothing but Gaussian noise: data-free",
    "labels": "class labels only (data-free, conditional)",
}


@dataclass
class Batch:
    """One training batch. Which fields are set depends on the method's ``needs``."""

    x0: Tensor | None = None
    label: Tensor | None = None
    noise: Tensor | None = None
    endpoint: Tensor | None = None

    @property
    def size(self) -> int:
        for value in (self.x0, self.noise, self.endpoint, self.label):
            if value is not None:
                return value.shape[0]
        raise ValueError("empty batch")

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if v is None else v.to(device) for v in (self.x0, self.label, self.noise,
                                                                       self.endpoint)))


@dataclass
class Phase:
    """A parameter group with its own optimizer: ``updates`` consecutive steps per cycle."""

    name: str
    parameters: list[nn.Parameter]
    updates: int = 1
    lr_scale: float = 1.0


@dataclass
class Sampling:
    """How a student draws samples at one NFE: a sampler of :mod:`fewstep.solvers` and its levels."""

    sampler: str
    sigmas: list[float] = field(default_factory=list)


@dataclass
class MethodConfig:
    """Hyper-parameters shared by all methods; each method subclasses this dataclass."""


class DistillationMethod(nn.Module):
    """Base class of all methods; see the module docstring for the protocol."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs: ClassVar[str] = "data"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    fsdp_refusal: ClassVar[str | None] = None  # why the method cannot train with sharded weights, if it cannot

    def __init__(self, teacher: Denoiser, student: Denoiser, config: MethodConfig):
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student
        self.config = config

    @classmethod
    def build_student(cls, teacher: Denoiser, config: MethodConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """The student a run starts from: the teacher's network (copied) when it has one, else
        ``new_backbone()``, EDM-preconditioned. Methods with another parametrisation override this."""
        return EDMDenoiser(teacher_backbone_copy(teacher) or new_backbone(), sigma_data)

    def phases(self) -> list[Phase]:
        return [Phase("student", list(self.student.parameters()))]

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def after_update(self, phase: str, step: int) -> bool:
        return False

    def sampling(self, nfe: int) -> Sampling:
        raise NotImplementedError

    def student_denoiser(self) -> Denoiser:
        """The network that generates (for methods whose student is not ``self.student``, override)."""
        return self.student

    def train(self, mode: bool = True) -> DistillationMethod:
        super().train(mode)
        self.teacher.eval()
        return self


def teacher_backbone_copy(teacher: Denoiser) -> nn.Module | None:
    """A trainable deep copy of the teacher's backbone (looking through a guidance wrapper), or None when the
    teacher is not a network (an analytic teacher)."""
    inner = getattr(teacher, "denoiser", teacher)
    backbone = getattr(inner, "backbone", None)
    return None if backbone is None else copy.deepcopy(backbone).requires_grad_(True)
