"""Consistency Training (CT). Song, Dhariwal, Chen & Sutskever, "Consistency Models", ICML 2023.

CD without a teacher: the teacher's ODE step is replaced by the one-sample estimate of the score. The
student is the consistency function ``f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, s)`` with
``f(x, s_min) = x`` built in (:class:`~fewstep.models.denoiser.ConsistencyDenoiser`). At training step ``k``
of ``K = total_steps``, on the Karras grid ``s_max = s_0 > ... > s_{N(k)-1} = s_min`` with
``i ~ U{0, ..., N(k) - 2}``::

    x_hi  = x0 + s_i eps,    x_lo = x0 + s_{i+1} eps                  (the SAME eps)
    L     = E[ d( f_theta(x_hi, s_i), sg f_theta-(x_lo, s_{i+1}) ) ]
    theta- <- mu(k) theta- + (1 - mu(k)) theta                         (EMA target network)
    N(k)  = ceil( sqrt( k/K ((s1 + 1)^2 - s0^2) + s0^2 ) - 1 ) + 1
    mu(k) = exp( s0 log(mu0) / N(k) )

``x_lo`` is one Euler step of the probability-flow ODE ``dx/ds = (x - D(x, s)) / s`` from ``x_hi`` with the
denoiser replaced by its one-sample estimate ``D ~ x0``; its expectation given ``x_hi`` is the Euler step
with the exact denoiser ``E[x0 | x_hi]``. ``d`` is the pseudo-Huber distance (iCT's
``c = 0.00054 sqrt(dim)``) or the squared L2 distance; ``lambda = 1``. Both passes see the same dropout
mask. Sampling is multistep consistency sampling, as for CD, with levels geometric from ``s_max`` to
``sampling_sigma_min`` (0.821, the paper's searched two-step level on CIFAR-10).

Deviations from the paper: the student starts from the teacher's network when the teacher has one (as
CD; the paper trains from scratch, as happens here with an analytic teacher); LPIPS is not offered (see
CD); the defaults ``s0 = 2, s1 = 150, mu0 = 0.9`` are the paper's CIFAR-10 values (800k updates), but
``K = total_steps`` is the length of our short run (the runner sets it to ``train.steps``), and the ring
recipe uses ``s1 = 40, mu0 = 0.5`` so that the target network can follow the curriculum in a few thousand
updates; after ``K`` steps ``N`` and ``mu`` stay at their final values.
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
    ema_update_,
    multistep_sigmas,
    online_and_target,
    same_eps_pair,
    target_copy,
)
from fewstep.models.denoiser import Denoiser
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, karras_sigmas


@dataclass
class CTConfig(MethodConfig):
    total_steps: int = 2000
    start_scales: int = 2
    final_scales: int = 150
    start_target_ema: float = 0.9
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    distance: str = "pseudo_huber"
    huber_c: float | None = None
    sampling_sigma_min: float = 0.821


def ct_num_scales(step: int, total_steps: int, start_scales: int, final_scales: int) -> int:
    """CT's discretisation curriculum ``N(k)``: grows like ``sqrt(k)`` from ``s0 + 1`` to ``s1 + 1`` levels."""
    k = min(step, total_steps)
    grown = math.sqrt(k / total_steps * ((final_scales + 1) ** 2 - start_scales**2) + start_scales**2)
    return math.ceil(grown - 1) + 1


def ct_target_ema(num_scales: int, start_scales: int, start_target_ema: float) -> float:
    """CT's target-network EMA rate ``mu(k) = exp(s0 log(mu0) / N(k))``."""
    return math.exp(start_scales * math.log(start_target_ema) / num_scales)


class ConsistencyTraining(DistillationMethod):
    name = "ct"
    family = "consistency"
    paper = "Song et al. 2023, Consistency Models (consistency training)"
    Config = CTConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: CTConfig):
        super().__init__(teacher, student, config)
        check_choice("distance", config.distance, DISTANCES)
        if config.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {config.total_steps}")
        if not 2 <= config.start_scales <= config.final_scales:
            raise ValueError(f"need 2 <= start_scales <= final_scales, got {config.start_scales} and "
                             f"{config.final_scales}")
        if not 0 < config.start_target_ema < 1:
            raise ValueError(f"start_target_ema must be in (0, 1), got {config.start_target_ema}")
        self.target = target_copy(student)
        self.huber_c = default_huber_c(student, config.huber_c)

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """The curriculum spans the run: ``total_steps = steps``."""
        return {"total_steps": steps}

    @classmethod
    def build_student(cls, teacher: Denoiser, config: CTConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """A consistency-parametrised network (the teacher's copy when it has one, as for CD)."""
        return consistency_student(teacher, new_backbone, sigma_data, config.sigma_min)

    def num_scales(self, step: int) -> int:
        c = self.config
        return ct_num_scales(step, c.total_steps, c.start_scales, c.final_scales)

    def grid(self, step: int) -> Tensor:
        c = self.config
        return karras_sigmas(self.num_scales(step), c.sigma_min, c.sigma_max, c.rho, dtype=torch.float32)

    def noisy_pair(self, x0: Tensor, s_hi: Tensor, s_lo: Tensor, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
        """The student's input at ``s_hi`` and the target's at ``s_lo`` (overridden by broken-target tests)."""
        return same_eps_pair(x0, s_hi, s_lo, generator)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond = batch.x0, batch.cond
        grid = self.grid(step).to(x0)
        index = torch.randint(0, grid.shape[0] - 1, (x0.shape[0],), generator=generator, device=x0.device)
        s_hi, s_lo = grid[index], grid[index + 1]
        x_hi, x_lo = self.noisy_pair(x0, s_hi, s_lo, generator)
        prediction, target = online_and_target(self.student, self.target, x_hi, s_hi, x_lo, s_lo, cond)
        per_sample = distance(prediction, target, self.config.distance, self.huber_c)
        return {"loss": per_sample.mean(), "num_scales": torch.tensor(float(grid.shape[0]), device=x0.device)}

    def after_update(self, phase: str, step: int) -> bool:
        mu = ct_target_ema(self.num_scales(step), self.config.start_scales, self.config.start_target_ema)
        ema_update_(self.target, self.student, mu)
        return False

    def sampling(self, nfe: int) -> Sampling:
        levels = multistep_sigmas(nfe, self.config.sigma_max, self.config.sampling_sigma_min)
        return Sampling("consistency", levels)
