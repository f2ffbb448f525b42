"""Shared method math: distances, EDM's loss weight, the target-network EMA, consistency pairs, teacher ODE steps
and level rules. Every method file takes these from here; no method imports helpers from another method's
file.

Distances are per sample, over all non-batch dimensions:

* pseudo-Huber ``d(a, b) = sqrt(|a - b|^2 + c^2) - c`` (iCT; ``c = 0.00054 sqrt(dim)`` by default);
* squared L2, as the mean ``mean_i (a - b)_i^2``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fewstep.errors import ConfigError
from fewstep.models.denoiser import Denoiser
from fewstep.paths import bcast
from fewstep.solvers import euler_step, heun_step

DISTANCES = ("pseudo_huber", "l2")
ODE_STEPS = ("euler", "heun")  # the teacher steps a method can take between two levels


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse ``method_args.<key> = value`` unless it is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"method_args.{key} must be one of {choices}, got {value!r}")


def check_rate(key: str, value: float) -> None:
    """Refuse ``method_args.<key>`` outside [0, 1] (an EMA rate, a probability)."""
    if not 0 <= value <= 1:
        raise ConfigError(f"method_args.{key} must be in [0, 1], got {value}")


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample ``sqrt(|a - b|^2 + c^2) - c``."""
    sq = (a - b).flatten(1).pow(2).sum(1)
    return torch.sqrt(sq + c**2) - c


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared error."""
    return (a - b).flatten(1).pow(2).mean(1)


def distance(prediction: Tensor, target: Tensor, kind: str, huber_c: float) -> Tensor:
    """Per-sample pseudo-Huber (``kind = "pseudo_huber"``) or mean squared (``"l2"``) distance."""
    if kind == "pseudo_huber":
        return pseudo_huber(prediction, target, huber_c)
    return squared_l2(prediction, target)


def default_huber_c(student: Denoiser, huber_c: float | None) -> float:
    """iCT's ``c = 0.00054 sqrt(dim)`` unless ``huber_c`` is given."""
    return huber_c if huber_c is not None else 0.00054 * math.sqrt(math.prod(student.data_shape))


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's loss weight ``lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2``: unit-variance error at every
    level for a denoising loss."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def target_copy(network: nn.Module) -> nn.Module:
    """A frozen copy of ``network`` for a target (EMA) network. Parameters already frozen in ``network`` (a LoRA
    student's base weights) are shared with it, not copied: they never change, and a copy would double the memory
    LoRA saves."""
    shared = {id(p): p for p in network.parameters() if not p.requires_grad}
    return copy.deepcopy(network, shared).requires_grad_(False)


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, mu: float) -> None:
    """``theta_target <- mu theta_target + (1 - mu) theta_source``, in place (shared parameters are left alone)."""
    for p_target, p in zip(target.parameters(), source.parameters(), strict=True):
        if p_target is not p:
            p_target.lerp_(p, 1.0 - mu)


def ode_step(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, s: Tensor, s_next: Tensor,
             solver: str) -> Tensor:
    """One probability-flow ODE step of ``denoise`` from ``s`` to ``s_next`` (both > 0, per sample): ``"euler"``
    is DDIM, ``"heun"`` EDM's second-order step (:mod:`fewstep.solvers`)."""
    step = heun_step if solver == "heun" else euler_step
    return step(denoise, x, s, s_next)


def same_eps_pair(x0: Tensor, s_hi: Tensor, s_lo: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(x0 + s_hi eps, x0 + s_lo eps)`` with one shared ``eps``: consistency training's teacher-free ODE step."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return x0 + bcast(s_hi, x0) * eps, x0 + bcast(s_lo, x0) * eps


def online_and_target(online: Denoiser, target: Denoiser, x_hi: Tensor, s_hi: Tensor, x_lo: Tensor,
                      s_lo: Tensor, cond) -> tuple[Tensor, Tensor]:
    """``online(x_hi, s_hi)`` with gradient and ``sg target(x_lo, s_lo)``, both under the same dropout mask:
    the global random state is restored after the first pass, so the second pass draws what it drew."""
    devices = [x_hi.device] if x_hi.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        prediction = online(x_hi, s_hi, cond)
    with torch.no_grad():
        target_value = target(x_lo, s_lo, cond)
    return prediction, target_value


def multistep_sigmas(nfe: int, sigma_max: float, sigma_min: float) -> list[float]:
    """``nfe`` levels geometric from ``sigma_max`` to ``sigma_min`` (just ``[sigma_max]`` for one step): the
    default levels of multistep consistency sampling."""
    if nfe == 1:
        return [sigma_max]
    return [sigma_max * (sigma_min / sigma_max) ** (k / (nfe - 1)) for k in range(nfe)]
