"""The method protocol: what every distillation method gives the trainer, the evaluator and the exporter.

A method is a small ``nn.Module`` that owns its networks (the student, and any target network, fake score or
discriminator) and knows nothing of devices, processes or files. It declares:

* ``name``, ``family``, ``paper`` and ``needs``: the set of training-signal kinds it consumes
  (:data:`fewstep.data.batch.NEEDS`). One kind gives :meth:`losses` a :class:`~fewstep.data.batch.Batch`;
  several give a :class:`~fewstep.data.batch.CompositeBatch` with one batch per kind;
* ``Config``: a dataclass of its hyper-parameters (unknown keys and wrong types are refused);
* :meth:`run_schedule`: the config fields that depend on the run's length (a curriculum's span, stage or round
  lengths, warm-ups), fitted to a run of a given number of steps; every entry point applies it to the fields
  the caller leaves out;
* :meth:`phases`: the parameter groups it updates, each with its own optimiser settings
  (:class:`Phase`: updates per cycle, learning-rate scale, betas, weight decay, gradient clip);
* :meth:`losses`: a dict of scalar tensors for one phase on one batch; ``"loss"`` is minimised, the rest are
  logged. A loss that carries no gradient (a phase with nothing to learn at this step) makes the phase idle:
  the trainer skips its update and logs it;
* :meth:`after_update`: bookkeeping after an optimizer step (EMA targets, stage changes); returns True when
  the phase's optimizer state must be reset (a new stage, e.g. a progressive-distillation round);
* :meth:`sampling`: how its student samples at a given NFE, as data (sampler name and levels), so an exported
  student is self-describing;
* :meth:`pair_request`: for a method that needs ``teacher_pairs``, which pairs (how many, from which solver at
  how many evaluations);
* ``fsdp_refusal``: None, or why it cannot train with sharded weights (``train.distributed=fsdp`` then stops
  with that reason). Sharding needs every network called through its ``forward``.

The teacher reaches a method wrapped in a :class:`~fewstep.models.denoiser.CountingDenoiser`, which counts
every evaluation (``teacher_evals``); methods never count by hand.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch, CompositeBatch
from fewstep.models.denoiser import (
    BoundaryDenoiser,
    ConsistencyDenoiser,
    CountingDenoiser,
    Denoiser,
    EDMDenoiser,
    PathDenoiser,
    innermost,
)
from fewstep.nets import add_extra_conditions
from fewstep.solvers import DEFAULT_TEACHER_NFE, Sampling


@dataclass
class Phase:
    """A parameter group with its own optimizer: ``updates`` consecutive steps per cycle, at ``lr_scale`` times
    the run's learning rate. ``betas``, ``weight_decay`` and ``grad_clip`` override the run's (``train.*``)
    when set (e.g. a fake score with betas (0, 0.999))."""

    name: str
    parameters: list[nn.Parameter]
    updates: int = 1
    lr_scale: float = 1.0
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None


@dataclass
class PairRequest:
    """The teacher pairs a method trains on: ``num_pairs`` (noise, endpoint) pairs of the teacher's ODE solved
    with ``solver`` at ``nfe`` evaluations (:func:`fewstep.solvers.solve`)."""

    num_pairs: int = 20000
    solver: str = "heun"
    nfe: int = DEFAULT_TEACHER_NFE


@dataclass
class MethodConfig:
    """Hyper-parameters shared by all methods; each method subclasses this dataclass."""


class DistillationMethod(nn.Module):
    """Base class of all methods; see the module docstring for the protocol."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"data"})
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    fsdp_refusal: ClassVar[str | None] = None  # why the method cannot train with sharded weights, if it cannot

    def __init__(self, teacher: Denoiser, student: Denoiser, config: MethodConfig):
        super().__init__()
        teacher = teacher if isinstance(teacher, CountingDenoiser) else CountingDenoiser(teacher)
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student
        self.config = config

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """The config fields that depend on the run's length, for a run of ``steps`` steps (``args``: the other
        arguments, on which a schedule may depend). None by default."""
        return {}

    @classmethod
    def fit_to_teacher(cls, max_level: float, args: dict) -> dict:
        """The config fields that must not exceed the teacher's highest noise level ``max_level`` (a diffusers VP
        teacher's last timestep, about 14.6 for Stable Diffusion), for the fields ``args`` leaves out: by default
        ``sigma_max`` and ``init_sigma`` where their defaults lie above it."""
        fields = {f.name: f.default for f in dataclasses.fields(cls.Config)}
        return {name: max_level for name in ("sigma_max", "init_sigma")
                if name in fields and name not in args and fields[name] > max_level}

    @classmethod
    def build_student(cls, teacher: Denoiser, config: MethodConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """The student a run starts from: the teacher's network (copied) read the teacher's way when it has one (a
        diffusers network keeps its path, prediction and time convention, so the student starts as the teacher),
        else ``new_backbone()``, EDM-preconditioned. Methods with another parametrisation override this."""
        inner = innermost(teacher)
        if isinstance(inner, PathDenoiser):
            return copy.deepcopy(inner).requires_grad_(True)
        return EDMDenoiser(teacher_backbone_copy(teacher) or new_backbone(), sigma_data)

    @property
    def teacher_evals(self) -> int:
        """Teacher evaluations (one per sample a call denoises) this method object has spent."""
        return self.teacher.evals

    def phases(self) -> list[Phase]:
        return [Phase("student", list(self.student.parameters()))]

    def losses(self, phase: str, batch: Batch | CompositeBatch, step: int,
               generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def after_update(self, phase: str, step: int) -> bool:
        return False

    def sampling(self, nfe: int) -> Sampling:
        raise NotImplementedError

    def pair_request(self) -> PairRequest:
        """The pairs a ``teacher_pairs`` source generates for this method."""
        return PairRequest()

    def student_denoiser(self) -> Denoiser:
        """The network that generates (for methods whose student is not ``self.student``, override)."""
        return self.student

    def train(self, mode: bool = True) -> DistillationMethod:
        super().train(mode)
        self.teacher.eval()
        return self


def consistency_student(teacher: Denoiser, new_backbone: Callable[[], nn.Module], sigma_data: float,
                        sigma_min: float, extra_conditions: int = 0) -> Denoiser:
    """A consistency-parametrised student (``f(x, sigma_min) = x``) that starts from the teacher's network: a
    diffusers teacher's copy read on its own path inside :class:`BoundaryDenoiser` (such a network takes no extra
    inputs, so ``extra_conditions`` are left out: check ``student.backbone`` for them), else the teacher's backbone
    (or ``new_backbone()``) with ``extra_conditions`` zero-initialised scalar inputs in a
    :class:`ConsistencyDenoiser`."""
    inner = innermost(teacher)
    if isinstance(inner, PathDenoiser):
        return BoundaryDenoiser(copy.deepcopy(inner).requires_grad_(True), sigma_min)
    backbone = teacher_backbone_copy(teacher) or new_backbone()
    return ConsistencyDenoiser(add_extra_conditions(backbone, extra_conditions) if extra_conditions else backbone,
                               sigma_data, sigma_min)


def teacher_backbone_copy(teacher: Denoiser) -> nn.Module | None:
    """A trainable deep copy of the teacher's backbone (looking through counting and guidance wrappers), or None
    when the teacher is not a network (an analytic teacher)."""
    backbone = getattr(innermost(teacher), "backbone", None)
    return None if backbone is None else copy.deepcopy(backbone).requires_grad_(True)
