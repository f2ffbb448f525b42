"""Consistency Distillation (CD). Song, Dhariwal, Chen & Sutskever, "Consistency Models", ICML 2023.

The student is a consistency function ``f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, s)`` with
``f(x, s_min) = x`` built into the parametrisation (:class:`~fewstep.models.denoiser.ConsistencyDenoiser`).
On the Karras grid ``s_max = s_0 > s_1 > ... > s_{N-1} = s_min``, with ``i ~ U{0, ..., N-2}``::

    x_hi  = x0 + s_i eps                                       (real data x0)
    x_lo  = Heun_teacher(x_hi, s_i -> s_{i+1})                 (one 2nd-order teacher ODE step)
    L     = E[ lambda(s_i) d( f_theta(x_hi, s_i), sg f_theta-(x_lo, s_{i+1}) ) ]
    theta- <- mu theta- + (1 - mu) theta                       (EMA target network)

with ``d`` the pseudo-Huber distance ``sqrt(|a - b|^2 + c^2) - c`` (iCT's ``c = 0.00054 sqrt(dim)``) or the
squared L2 distance, and ``lambda = 1``. Sampling is multistep consistency sampling: ``x0 = f(x, s_k)``,
re-noise ``x = x0 + s_{k+1} z``, for a short decreasing list of levels.

Deviations from the paper: LPIPS is not offered (it leaks ImageNet features into feature-space metrics,
and our data are not natural images); the multistep levels are a fixed rule (geometric between
``s_max`` and ``sampling_sigma_min``) rather than found by ternary search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.base import DistillationMethod, MethodConfig, consistency_student
from fewstep.methods.losses import (
    DISTANCES,
    check_choice,
    check_rate,
    default_huber_c,
    distance,
    ema_update_,
    multistep_sigmas,
    target_copy,
)
from fewstep.models.denoiser import Denoiser
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, heun_step, karras_sigmas


@dataclass
class CDConfig(MethodConfig):
    num_scales: int = 18
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    target_ema: float = 0.95
    distance: str = "pseudo_huber"
    huber_c: float | None = None
    sampling_sigma_min: float = 0.1


class ConsistencyDistillation(DistillationMethod):
    name = "cd"
    family = "consistency"
    paper = "Song et al. 2023, Consistency Models"
    Config = CDConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: CDConfig):
        super().__init__(teacher, student, config)
        check_choice("distance", config.distance, DISTANCES)
        check_rate("target_ema", config.target_ema)
        if config.num_scales < 2:
            raise ConfigError(f"method_args.num_scales must be >= 2, got {config.num_scales}")
        self.target = target_copy(student)
        self.register_buffer("grid", karras_sigmas(config.num_scales, config.sigma_min, config.sigma_max,
                                                   config.rho, dtype=torch.float32))
        self.huber_c = default_huber_c(student, config.huber_c)

    @classmethod
    def build_student(cls, teacher: Denoiser, config: CDConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """The teacher's network (or a new one) with consistency coefficients: ``f(x, sigma_min) = x``."""
        return consistency_student(teacher, new_backbone, sigma_data, config.sigma_min)

    def teacher_step(self, x: Tensor, s: Tensor, s_next: Tensor, cond) -> Tensor:
        """One Heun step of the teacher's probability-flow ODE from ``s`` to ``s_next`` (both > 0)."""
        return heun_step(lambda y, level: self.teacher(y, level, cond), x, s, s_next)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond = batch.x0, batch.cond
        index = torch.randint(0, self.config.num_scales - 1, (x0.shape[0],), generator=generator, device=x0.device)
        s_hi, s_lo = self.grid[index].to(x0), self.grid[index + 1].to(x0)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0)
        x_hi = x0 + bcast(s_hi, x0) * eps
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, s_hi, s_lo, cond)
            target = self.target(x_lo, s_lo, cond)
        prediction = self.student(x_hi, s_hi, cond)
        return {"loss": distance(prediction, target, self.config.distance, self.huber_c).mean()}

    def after_update(self, phase: str, step: int) -> bool:
        ema_update_(self.target, self.student, self.config.target_ema)
        return False

    def sampling(self, nfe: int) -> Sampling:
        levels = multistep_sigmas(nfe, self.config.sigma_max, self.config.sampling_sigma_min)
        return Sampling("consistency", levels)
