"""Easy Consistency Tuning (ECT). Geng, Pokle, Luo, Lin & Kolter, "Consistency Models Made Easy", 2024.

Continuous-time consistency training that starts from a pretrained diffusion model: the student is the
teacher's network (copied) read with consistency coefficients (``f(x, s_min) = x``), and is tuned on data
alone, no teacher evaluations. The gap ``dt = t - r`` starts at ``t`` (``r = 0``: the diffusion model's own
denoising loss, "stage 0") and shrinks by ``q`` every stage::

    ln t ~ N(P_mean, P_std^2),   eps ~ N(0, I)
    dt   = t n(t) / q^stage,     n(t) = 1 + k sigmoid(-b t),     r = max(t - dt, 0)
    x_t  = x0 + t eps,           x_r = x0 + r eps                        (the SAME eps)
    y    = sg f_theta(x_r, r)  if r > 0,  else x0                        (stop-grad online target)
    L    = E[ w(t, r) d( f_theta(x_t, t), y ) ],   d(a, b) = sqrt(|a - b|^2 + c^2) - c
    w(t, r) = 1 / (t - r)           (weighting = "inverse_gap", the default)
    w(t, r) = 1/t^2 + 1/sd^2        (weighting = "edm", the reference code's)

with ``stage = start_stage + floor(k / steps_per_stage)`` at training step ``k``. ``c = 0`` (the default)
makes ``d`` the plain L2 norm, i.e. the squared loss with adaptive weight ``1 / |a - b|``. Both passes see
the same dropout mask. With ``weighting: edm`` and ``distance: l2`` (mean squared error) stage 0 is exactly
EDM's denoising loss (:mod:`fewstep.train.teacher`). Sampling is multistep consistency sampling, as for CD.

Defaults follow the reference code (``P_mean = -1.1``, ``P_std = 2``, ``q = 2``, ``k = 8``, ``b = 1``,
``c = 0``) except the weighting: ``1 / (t - r)`` is FastGen's consistency-model default and iCT's
``1 / (s_{i+1} - s_i)`` in continuous form (the two weightings compared: ``docs/consistency.md``).
The reference code's stage index ``j`` is our ``stage - 1`` (its first tuning stage already has
``dt = t n(t) / q``), so ``start_stage = 1`` starts tuning from a pretrained model and ``start_stage = 0``
first pretrains a fresh network with the denoising loss for ``steps_per_stage`` steps.

Deviations from the paper: ``t`` is clipped to ``[sigma_min, sigma_max]`` (the levels the student is
sampled at); ``steps_per_stage`` is set for our short runs (the paper tunes ~25k updates per stage);
no EDM2 forced weight normalisation exists here to disable in the target pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.methods.base import DistillationMethod, MethodConfig, consistency_student
from fewstep.methods.losses import (
    DISTANCES,
    check_choice,
    distance,
    multistep_sigmas,
    online_and_target,
    same_eps_pair,
)
from fewstep.models.denoiser import Denoiser
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling

WEIGHTINGS = ("inverse_gap", "edm")


@dataclass
class ECTConfig(MethodConfig):
    steps_per_stage: int = 250
    start_stage: int = 1
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    p_mean: float = -1.1
    p_std: float = 2.0
    distance: str = "pseudo_huber"
    huber_c: float = 0.0
    weighting: str = "inverse_gap"
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    sampling_sigma_min: float = 0.821


def ect_r(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's ``r(t) = max(t - t n(t) / q^stage, 0)`` with ``n(t) = 1 + k sigmoid(-b t)``: 0 at stage 0, and
    ``(t - r) / t`` shrinks by ``q`` every stage."""
    dt = t * (1.0 + k * torch.sigmoid(-b * t)) * q ** -stage  # q ** -stage underflows to 0 where q ** stage overflows
    return torch.clamp(t - dt, min=0.0)


class EasyConsistencyTuning(DistillationMethod):
    name = "ect"
    family = "consistency"
    paper = "Geng et al. 2024, Consistency Models Made Easy"
    Config = ECTConfig
    stages_per_run = 8  # a run fitted to its length (run_schedule) goes through 8 stages of dt shrinking

    def __init__(self, teacher: Denoiser, student: Denoiser, config: ECTConfig):
        super().__init__(teacher, student, config)
        check_choice("distance", config.distance, DISTANCES)
        if config.steps_per_stage < 1:
            raise ValueError(f"steps_per_stage must be >= 1, got {config.steps_per_stage}")
        if config.start_stage < 0:
            raise ValueError(f"start_stage must be >= 0, got {config.start_stage}")
        if not config.q > 1:
            raise ValueError(f"q must be > 1 (the factor dt shrinks by per stage), got {config.q}")
        if not config.p_std > 0:
            raise ValueError(f"p_std must be positive, got {config.p_std}")
        check_choice("weighting", config.weighting, WEIGHTINGS)
        self.sigma_data = student.sigma_data

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """The run's steps split evenly into :attr:`stages_per_run` stages."""
        return {"steps_per_stage": max(1, steps // cls.stages_per_run)}

    @classmethod
    def build_student(cls, teacher: Denoiser, config: ECTConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """The teacher's network (copied) with consistency coefficients; a new network when the teacher has
        none (then start at ``start_stage = 0`` to pretrain it)."""
        return consistency_student(teacher, new_backbone, sigma_data, config.sigma_min)

    def stage(self, step: int) -> int:
        return self.config.start_stage + step // self.config.steps_per_stage

    def noisy_pair(self, x0: Tensor, t: Tensor, r: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(x0 + t eps, x0 + r eps)`` with one shared ``eps`` (overridden by broken-target tests)."""
        return same_eps_pair(x0, t, r, generator)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond, c = batch.x0, batch.cond, self.config
        normal = torch.randn(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
        t = torch.exp(c.p_mean + c.p_std * normal).clamp(c.sigma_min, c.sigma_max)
        r = ect_r(t, self.stage(step), c.q, c.k, c.b)
        x_t, x_r = self.noisy_pair(x0, t, r, generator)
        positive = r > 0
        r_safe = torch.where(positive, r, torch.full_like(r, c.sigma_min))  # r = 0 rows use x0 instead
        prediction, target = online_and_target(self.student, self.student, x_t, t, x_r, r_safe, cond)
        target = torch.where(positive.reshape(-1, *([1] * (x0.ndim - 1))), target, x0)
        per_sample = distance(prediction, target, c.distance, c.huber_c)
        weight = 1.0 / (t - r) if c.weighting == "inverse_gap" else 1.0 / t**2 + 1.0 / self.sigma_data**2
        return {"loss": (weight * per_sample).mean(),
                "r_over_t": (r / t).mean().detach()}

    def sampling(self, nfe: int) -> Sampling:
        levels = multistep_sigmas(nfe, self.config.sigma_max, self.config.sampling_sigma_min)
        return Sampling("consistency", levels)
