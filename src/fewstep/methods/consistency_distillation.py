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

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.errors import ConfigError
from fewstep.methods.base import Batch, DistillationMethod, MethodConfig, Sampling, teacher_backbone_copy
from fewstep.models.denoiser import ConsistencyDenoiser, Denoiser
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, karras_sigmas


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


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample ``sqrt(|a - b|^2 + c^2) - c`` over all non-batch dimensions."""
    sq = (a - b).flatten(1).pow(2).sum(1)
    return torch.sqrt(sq + c**2) - c


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared error."""
    return (a - b).flatten(1).pow(2).mean(1)


def check_distance(distance: str) -> None:
    if distance not in ("pseudo_huber", "l2"):
        raise ConfigError(f"method_args.distance must be 'pseudo_huber' or 'l2', got {distance!r}")


def consistency_distance(prediction: Tensor, target: Tensor, distance: str, huber_c: float) -> Tensor:
    """Per-sample pseudo-Huber (``distance = "pseudo_huber"``) or mean squared (``"l2"``) distance."""
    if distance == "pseudo_huber":
        return pseudo_huber(prediction, target, huber_c)
    return squared_l2(prediction, target)


def default_huber_c(student: Denoiser, huber_c: float | None) -> float:
    """iCT's ``c = 0.00054 sqrt(dim)`` unless ``huber_c`` is given."""
    return huber_c if huber_c is not None else 0.00054 * math.sqrt(math.prod(student.data_shape))


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, mu: float) -> None:
    """``theta_target <- mu theta_target + (1 - mu) theta_source``, in place."""
    for p_target, p in zip(target.parameters(), source.parameters(), strict=True):
        p_target.lerp_(p, 1.0 - mu)


def multistep_sigmas(nfe: int, sigma_max: float, sigma_min: float) -> list[float]:
    """``nfe`` levels geometric from ``sigma_max`` to ``sigma_min`` (just ``[sigma_max]`` for one step)."""
    if nfe == 1:
        return [sigma_max]
    return [sigma_max * (sigma_min / sigma_max) ** (k / (nfe - 1)) for k in range(nfe)]


class ConsistencyDistillation(DistillationMethod):
    name = "cd"
    family = "consistency"
    paper = "Song et al. 2023, Consistency Models"
    needs = "data"
    Config = CDConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: CDConfig):
        super().__init__(teacher, student, config)
        check_distance(config.distance)
        if config.num_scales < 2:
            raise ValueError(f"num_scales must be >= 2, got {config.num_scales}")
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.register_buffer("grid", karras_sigmas(config.num_scales, config.sigma_min, config.sigma_max,
                                                   config.rho, dtype=torch.float32))
        self.huber_c = default_huber_c(student, config.huber_c)
        self.teacher_evals = 0

    @classmethod
    def build_student(cls, teacher: Denoiser, config: CDConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """The teacher's network (or a new one) with consistency coefficients: ``f(x, sigma_min) = x``."""
        return ConsistencyDenoiser(teacher_backbone_copy(teacher) or new_backbone(), sigma_data, config.sigma_min)

    def heun_step(self, x: Tensor, s: Tensor, s_next: Tensor, label: Tensor | None) -> Tensor:
        """One Heun step of the teacher's probability-flow ODE from ``s`` to ``s_next`` (both > 0)."""
        d = (x - self.teacher(x, s, label)) / bcast(s, x)
        x_euler = x + bcast(s_next - s, x) * d
        d_next = (x_euler - self.teacher(x_euler, s_next, label)) / bcast(s_next, x)
        return x + bcast(s_next - s, x) * 0.5 * (d + d_next)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, label = batch.x0, batch.label
        index = torch.randint(0, self.config.num_scales - 1, (x0.shape[0],), generator=generator, device=x0.device)
        s_hi, s_lo = self.grid[index].to(x0), self.grid[index + 1].to(x0)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0)
        x_hi = x0 + bcast(s_hi, x0) * eps
        with torch.no_grad():
            x_lo = self.heun_step(x_hi, s_hi, s_lo, label)
            target = self.target(x_lo, s_lo, label)
        self.teacher_evals += 2 * x0.shape[0]
        prediction = self.student(x_hi, s_hi, label)
        per_sample = consistency_distance(prediction, target, self.config.distance, self.huber_c)
        return {"loss": per_sample.mean()}

    def after_update(self, phase: str, step: int) -> bool:
        ema_update_(self.target, self.student, self.config.target_ema)
        return False

    def sampling(self, nfe: int) -> Sampling:
        levels = multistep_sigmas(nfe, self.config.sigma_max, self.config.sampling_sigma_min)
        return Sampling("consistency", levels)
