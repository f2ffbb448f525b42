"""Sub-path Linear Approximation Model (SLAM, later SPLAM). Xu, Song, Feng, Li, Ge, Zheng & Wang, "Accelerating
Image Generation with Sub-path Linear Approximation Model", ECCV 2024.

There is no public code; this is a reconstruction from the paper's abstract and its sub-path interpolation
``x_{gamma,t} = (1 - gamma) (alpha_t / alpha_{t-k}) x_{t-k} + gamma x_t``. The math below, and every choice
marked *ours*, is this module's.

The probability-flow ODE trajectory is cut at sampled points into sub-paths of ``k`` steps of the Karras grid
``s_0 = s_max > ... > s_{N-1} = s_min``. A sub-path runs from ``x_hi`` at ``s_hi = s_n`` down to ``x_lo`` at
``s_lo = s_{n+k}``. Dividing the paper's interpolation by ``alpha_t`` turns it into the VE coordinate
(``x / alpha``), where the sub-path linear (SL) ODE is the straight chord between the two endpoints, travelled
at constant speed in ``gamma`` and, *ours*, assigned the linearly interpolated noise level::

    x_gamma = (1 - gamma) x_lo + gamma x_hi,    s_gamma = (1 - gamma) s_lo + gamma s_hi,    gamma in [0, 1]
    d x_gamma / d gamma = x_hi - x_lo          (the SL-ODE; exact when the trajectory is straight in s)

Each chord point is mapped by the consistency function and compared with the sub-path's lower endpoint::

    n ~ U{0, ..., N-1-k},  gamma ~ U[0, 1]
    x_hi  = x0 + s_hi eps                                        (real data x0)
    x_lo  = Heun_teacher^k(x_hi, s_n -> s_{n+1} -> ... -> s_{n+k})  (k teacher Heun steps, 2k evaluations)
    L     = E[ d( f_theta(x_gamma, s_gamma; gamma), sg f_theta-(x_lo, s_lo; 1) ) ]
    theta- <- mu theta- + (1 - mu) theta                          (EMA target network)

The loss is a progressive, continuous estimate of the error along the sub-path: it is zero at
``gamma = 0`` (where ``x_gamma = x_lo``, for ``theta = theta-``) and grows along the chord to consistency
distillation's endpoint error at ``gamma = 1``, where it *is* the CD loss (``x_gamma = x_hi``). With ``k = 1``
the sub-path is one teacher step, so SLAM is CD whose online point slides along the step's chord.

Choices that are ours (the paper's details are unverified here):

* The student's inputs are the chord point, its interpolated level ``s_gamma`` and, as in the paper, ``gamma``
  itself (a zero-initialised extra condition, :func:`fewstep.nets.add_extra_conditions`); the paper feeds the
  sub-path's upper time ``t`` with ``gamma``. ``gamma`` tells the network that a point lies on a chord, off the
  trajectory: without it, the chord points (labelled ``s_gamma``) bias the map at on-trajectory points of that
  level (on the ring, 3x the excess NLL of CD and over-spread modes). Points on the trajectory (the target's
  ``x_lo``, and every sampling step) use ``gamma = 1``: the sampling student is the network at ``gamma = 1``.
* The target is the EMA target network at the lower endpoint; ``d`` is CD's pseudo-Huber or squared L2
  distance with weight 1 (the paper's distance and weighting are unknown to us).
* The teacher solves the sub-path with ``k`` Heun steps on the grid (the latent-diffusion variant uses one
  CFG-augmented DDIM step over a skip of ``k``).

EMA target and multistep sampling: as in :mod:`fewstep.methods.consistency.consistency_distillation`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.base import teacher_backbone_copy
from fewstep.methods.consistency.consistency_distillation import CDConfig, ConsistencyDistillation
from fewstep.methods.losses import distance
from fewstep.models.denoiser import ConsistencyDenoiser, Denoiser, FixedExtraDenoiser
from fewstep.nets import add_extra_conditions
from fewstep.paths import bcast


@dataclass
class SLAMConfig(CDConfig):
    subpath_steps: int = 1


def sub_path_point(x_lo: Tensor, x_hi: Tensor, s_lo: Tensor, s_hi: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """The SL-ODE point at ``gamma`` (shape ``(B,)``) and its noise level: ``(x_lo, s_lo)`` at 0, ``(x_hi, s_hi)``
    at 1, linear in between."""
    x = torch.lerp(x_lo, x_hi, bcast(gamma, x_lo))
    return x, torch.lerp(s_lo, s_hi, gamma)


class SubpathLinearApproximation(ConsistencyDistillation):
    name = "slam"
    family = "consistency"
    paper = "Xu et al. 2024, Accelerating Image Generation with Sub-path Linear Approximation Model"
    Config = SLAMConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: SLAMConfig):
        super().__init__(teacher, student, config)
        if not 1 <= config.subpath_steps < config.num_scales:
            raise ConfigError(f"method_args.subpath_steps must be in [1, num_scales - 1 = "
                              f"{config.num_scales - 1}], got {config.subpath_steps}")

    @classmethod
    def build_student(cls, teacher: Denoiser, config: SLAMConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """CD's consistency student with ``gamma`` as a zero-initialised extra condition."""
        backbone = add_extra_conditions(teacher_backbone_copy(teacher) or new_backbone(), 1)
        return ConsistencyDenoiser(backbone, sigma_data, config.sigma_min)

    def student_denoiser(self) -> Denoiser:
        """The student on the trajectory (``gamma = 1``): a plain ``(x, s, cond)`` denoiser sharing its weights."""
        return FixedExtraDenoiser(self.student, [1.0])

    def solve_sub_path(self, x: Tensor, index: Tensor, cond) -> Tensor:
        """The teacher's ODE from ``grid[index]`` down ``subpath_steps`` grid intervals (one Heun step each)."""
        for i in range(self.config.subpath_steps):
            x = self.teacher_step(x, self.grid[index + i].to(x), self.grid[index + i + 1].to(x), cond)
        return x

    def sub_path_loss(self, x_hi: Tensor, x_lo: Tensor, s_hi: Tensor, s_lo: Tensor, gamma: Tensor,
                      cond) -> Tensor:
        """Per-sample ``d(f_theta(x_gamma, s_gamma; gamma), sg f_theta-(x_lo, s_lo; 1))``."""
        x_gamma, s_gamma = sub_path_point(x_lo, x_hi, s_lo, s_hi, gamma)
        with torch.no_grad():
            target = self.target(x_lo, s_lo, cond, torch.ones_like(gamma)[:, None])
        prediction = self.student(x_gamma, s_gamma, cond, gamma[:, None])
        return distance(prediction, target, self.config.distance, self.huber_c)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond = batch.x0, batch.cond
        k = self.config.subpath_steps
        index = torch.randint(0, self.config.num_scales - k, (x0.shape[0],), generator=generator, device=x0.device)
        s_hi, s_lo = self.grid[index].to(x0), self.grid[index + k].to(x0)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0)
        gamma = torch.rand(x0.shape[0], generator=generator, device=x0.device).to(x0)
        x_hi = x0 + bcast(s_hi, x0) * eps
        with torch.no_grad():
            x_lo = self.solve_sub_path(x_hi, index, cond)
        return {"loss": self.sub_path_loss(x_hi, x_lo, s_hi, s_lo, gamma, cond).mean()}
