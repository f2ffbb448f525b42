"""Improved Consistency Training (iCT). Song & Dhariwal, "Improved Techniques for Training Consistency
Models", ICLR 2024.

CT (:mod:`fewstep.methods.consistency_training`) with five changes. At training step ``k`` of
``K = total_steps``, on the Karras grid ``s_max = s_0 > ... > s_{N(k)-1} = s_min``::

    x_hi   = x0 + s_i eps,    x_lo = x0 + s_{i+1} eps                    (the SAME eps)
    L      = E_i[ lambda_i d( f_theta(x_hi, s_i), sg f_theta(x_lo, s_{i+1}) ) ]   (no EMA target)
    lambda_i = 1 / (s_i - s_{i+1})
    d(a, b)  = sqrt(|a - b|^2 + c^2) - c,    c = 0.00054 sqrt(dim)           (pseudo-Huber)
    p(i)     ~ erf((ln s_i - P_mean) / (sqrt2 P_std)) - erf((ln s_{i+1} - P_mean) / (sqrt2 P_std))
    N(k)     = min(s0 2^floor(k / K'), s1) + 1,    K' = floor(K / (log2 floor(s1 / s0) + 1))

``p(i)`` is the lognormal ``ln s ~ N(P_mean, P_std^2)`` (``P_mean = -1.1``, ``P_std = 2``) discretised onto
the grid's intervals. The target is the online network itself under stop-gradient, with the same dropout
mask. Sampling is multistep consistency sampling, as for CD, with levels geometric from ``s_max`` to
``sampling_sigma_min`` (0.821); EMA weights are for evaluation only (the trainer's EMA).

Deviations from the paper: the student starts from the teacher's network when the teacher has one (as
CD; the paper trains from scratch, as happens here with an analytic teacher). The paper's curriculum
(``s0 = 10``, ``s1 = 1280``) spans 400k updates, i.e. 50k updates per doubling; ``K`` here is the length
of our short run (``total_steps``, which the runner sets to ``train.steps``), and the recipes use a
smaller ``s1`` (160) so that each doubling still gets a few hundred updates. The paper's network changes
(Fourier scale 0.02, dropout 0.3) are backbone settings, not part of this method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.methods.base import DistillationMethod, MethodConfig, consistency_student
from fewstep.methods.losses import (
    DISTANCES,
    check_choice,
    default_huber_c,
    distance,
    multistep_sigmas,
    online_and_target,
    same_eps_pair,
)
from fewstep.models.denoiser import Denoiser
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, karras_sigmas


@dataclass
class ICTConfig(MethodConfig):
    total_steps: int = 2000
    start_scales: int = 10
    final_scales: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    distance: str = "pseudo_huber"
    huber_c: float | None = None
    sampling_sigma_min: float = 0.821


def ict_num_scales(step: int, total_steps: int, start_scales: int, final_scales: int) -> int:
    """iCT's exponential curriculum ``N(k)``: ``s0 + 1`` levels, doubling the intervals in equal stages, to
    ``s1 + 1``."""
    steps_per_doubling = math.floor(total_steps / (math.log2(final_scales // start_scales) + 1))
    doublings = step // max(steps_per_doubling, 1)
    return min(start_scales * 2**doublings, final_scales) + 1


def lognormal_interval_probabilities(grid: Tensor, p_mean: float, p_std: float) -> Tensor:
    """The probability of each interval ``[s_{i+1}, s_i]`` of the decreasing ``grid`` under
    ``ln s ~ N(p_mean, p_std^2)``, renormalised over the grid's range."""
    cdf = torch.erf((torch.log(grid.double()) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[:-1] - cdf[1:]
    return (mass / mass.sum()).to(grid.dtype)


class ImprovedConsistencyTraining(DistillationMethod):
    name = "ict"
    family = "consistency"
    paper = "Song & Dhariwal 2024, Improved Techniques for Training Consistency Models"
    Config = ICTConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: ICTConfig):
        super().__init__(teacher, student, config)
        check_choice("distance", config.distance, DISTANCES)
        if config.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {config.total_steps}")
        if not 1 <= config.start_scales <= config.final_scales:
            raise ValueError(f"need 1 <= start_scales <= final_scales, got {config.start_scales} and "
                             f"{config.final_scales}")
        if not config.p_std > 0:
            raise ValueError(f"p_std must be positive, got {config.p_std}")
        self.huber_c = default_huber_c(student, config.huber_c)

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """The curriculum spans the run: ``total_steps = steps``."""
        return {"total_steps": steps}

    @classmethod
    def build_student(cls, teacher: Denoiser, config: ICTConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """A consistency-parametrised network (the teacher's copy when it has one, as for CD)."""
        return consistency_student(teacher, new_backbone, sigma_data, config.sigma_min)

    def num_scales(self, step: int) -> int:
        c = self.config
        return ict_num_scales(step, c.total_steps, c.start_scales, c.final_scales)

    def grid(self, step: int) -> Tensor:
        c = self.config
        return karras_sigmas(self.num_scales(step), c.sigma_min, c.sigma_max, c.rho, dtype=torch.float32)

    def sample_intervals(self, grid: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """``n`` interval indices ``i`` (pairs ``s_i > s_{i+1}``) drawn from the discretised lognormal."""
        probabilities = lognormal_interval_probabilities(grid, self.config.p_mean, self.config.p_std)
        return torch.multinomial(probabilities.to(generator.device), n, replacement=True, generator=generator)

    def noisy_pair(self, x0: Tensor, s_hi: Tensor, s_lo: Tensor, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
        """The student's input at ``s_hi`` and the target's at ``s_lo`` (overridden by broken-target tests)."""
        return same_eps_pair(x0, s_hi, s_lo, generator)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond = batch.x0, batch.cond
        grid = self.grid(step)
        index = self.sample_intervals(grid, x0.shape[0], generator).to(x0.device)
        grid = grid.to(x0)
        s_hi, s_lo = grid[index], grid[index + 1]
        x_hi, x_lo = self.noisy_pair(x0, s_hi, s_lo, generator)
        prediction, target = online_and_target(self.student, self.student, x_hi, s_hi, x_lo, s_lo, cond)
        per_sample = distance(prediction, target, self.config.distance, self.huber_c)
        weight = 1.0 / (s_hi - s_lo)
        return {"loss": (weight * per_sample).mean(),
                "num_scales": torch.tensor(float(grid.shape[0]), device=x0.device)}

    def sampling(self, nfe: int) -> Sampling:
        levels = multistep_sigmas(nfe, self.config.sigma_max, self.config.sampling_sigma_min)
        return Sampling("consistency", levels)
