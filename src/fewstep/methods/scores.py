"""Shared math of distribution matching: fake scores, the DMD gradient, noise-level samplers and few-step
generation with backward simulation. DMD, DMD2 and rCM take these from here.

Notation: ``G`` is the student generator, ``x_G = G(z)`` its sample, ``D_real`` the teacher's denoiser (with
guidance when the teacher has it), ``D_fake`` a denoiser trained on the student's samples only, never guided.
At noise level ``sigma`` the score difference is ``s_fake - s_real = (D_fake - D_real) / sigma^2``, the gradient
of ``KL(p_G,sigma || p_teacher,sigma)`` in ``x``, so a step against it moves the student's samples from where it
puts mass towards where the teacher does.

* :func:`dmd_direction`: DMD's per-sample normalised gradient ``g = (D_fake - D_real) / mean_D |x_G - D_real|``
  (the normalisation replaces the theoretical weight ``w(sigma)`` and makes the step size level-free);
* :func:`pseudo_target_loss`: ``L = 1/2 mean_D || x_G - sg(x_G - g) ||^2``, whose gradient in ``x_G`` is
  ``g / D``: autograd carries ``g`` into the generator's parameters;
* :func:`fake_score_loss`: the fake score's denoising loss on ``sg x_G`` with EDM's weight
  ``lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2``;
* :func:`karras_index_sigma`: levels drawn uniformly by index from a 1000-entry Karras grid (DMD2's EDM
  convention; ``[0.02, 0.98]`` of it for the generator's loss, all of it for the fake score);
  :func:`shifted_sigma`: rCM's ``sigma_d s / (1 - s)`` with ``s`` a shifted uniform draw;
  :func:`karras_position_sigma`: levels at a uniform position along the continuous Karras schedule (SiD, SIM);
  :func:`log_normal_sigma`: EDM's lognormal training levels (Diff-Instruct, SiD's fake score);
* :func:`generate`: a few-step sample ``x_G`` on given levels, gradient through the last network call only
  (backward simulation: the input of the last step comes from the generator itself, not from noised data);
* :func:`index_levels`: ``nfe`` generator levels spread by index over the Karras grid (DMD2's 999, 749, 499,
  249 timesteps, in sigma);
* :data:`WEIGHTINGS` and :func:`density_ratio`: the f-divergences' ``h(r) = f''(r) r^2`` and the density ratio
  ``r = p_teacher / q_student`` read from a discriminator's logit (f-distill, Uni-Instruct);
* :func:`frozen`: a network with its parameters' gradients off, still differentiated in its input (SiD, SIM,
  Uni-Instruct).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fewstep.errors import ConfigError
from fewstep.methods.losses import edm_weight
from fewstep.models.denoiser import Denoiser
from fewstep.paths import bcast
from fewstep.solvers import RHO, SIGMA_MAX, SIGMA_MIN, karras_sigmas, sample_consistency

GRID_SIZE = 1000  # DMD2's EDM grid: Karras levels, rho 7, sigma 0.002 to 80


def karras_grid(dtype: torch.dtype = torch.float64) -> Tensor:
    """The 1000 descending Karras levels the samplers below index into."""
    return karras_sigmas(GRID_SIZE, SIGMA_MIN, SIGMA_MAX, 7.0, dtype=dtype)


def karras_index_sigma(batch: int, generator: torch.Generator, like: Tensor, low: float = 0.0,
                       high: float = 1.0) -> Tensor:
    """``batch`` levels drawn uniformly by index from the part ``[low, high)`` of :func:`karras_grid` (0 is the
    top, 80; 1 the bottom, 0.002)."""
    lo, hi = round(low * GRID_SIZE), max(round(high * GRID_SIZE), round(low * GRID_SIZE) + 1)
    index = torch.randint(lo, hi, (batch,), generator=generator, device=like.device)
    return karras_grid().to(like.device)[index].to(like.dtype)


def shifted_sigma(batch: int, generator: torch.Generator, like: Tensor, shift: float, sigma_data: float) -> Tensor:
    """rCM's levels ``sigma_d s / (1 - s)`` with ``s = a u / (1 + (a - 1) u)``, ``u ~ U(0.02, 0.98)``, ``a = shift``:
    skewed towards high noise for ``a > 1``."""
    u = 0.02 + 0.96 * torch.rand(batch, generator=generator, device=like.device).to(like.dtype)
    s = shift * u / (1 + (shift - 1) * u)
    return (sigma_data * s / (1 - s)).clamp(max=SIGMA_MAX)


def log_normal_sigma(batch: int, generator: torch.Generator, like: Tensor, p_mean: float, p_std: float) -> Tensor:
    """EDM's training levels ``sigma = exp(p_mean + p_std n)``, ``n ~ N(0, 1)`` (Diff-Instruct, SiD's fake score)."""
    n = torch.randn(batch, generator=generator, device=like.device, dtype=like.dtype)
    return torch.exp(p_mean + p_std * n)


def index_levels(nfe: int) -> list[float]:
    """``nfe`` generator levels at grid indices ``k * 1000 / nfe`` (the first is ``SIGMA_MAX``): nested for
    ``nfe`` dividing another, so a 4-step schedule holds the 2-step one."""
    grid = karras_grid()
    return [float(grid[k * GRID_SIZE // nfe]) for k in range(nfe)]


def generate(student: Denoiser, noise: Tensor, levels: list[float], cond, generator: torch.Generator) -> Tensor:
    """``x_G``: consistency sampling of ``student`` from ``levels[0] * noise`` down to ``levels[-1]`` without
    gradient, re-noised there with fresh noise, then one network call at ``levels[-1]`` that records gradients
    when they are enabled (one step: just that call on ``levels[0] * noise``)."""
    x = levels[0] * noise
    if len(levels) > 1:
        x0 = sample_consistency(lambda y, s: student(y, s, cond), x, torch.tensor(levels[:-1]), generator)
        x = x0 + levels[-1] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return student(x, torch.full((x.shape[0],), levels[-1], device=x.device, dtype=x.dtype), cond)


def noised(x: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """``x + sigma eps`` with fresh ``eps``."""
    return x + bcast(sigma, x) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def dmd_direction(x_generated: Tensor, real: Tensor, fake: Tensor) -> Tensor:
    """DMD's normalised gradient ``(fake - real) / mean_D |x_G - real|`` per sample."""
    scale = (x_generated - real).abs().flatten(1).mean(1).clamp(min=1e-8)
    return (fake - real) / bcast(scale, fake)


def pseudo_target_loss(x_generated: Tensor, direction: Tensor) -> Tensor:
    """``1/2 mean_D || x_G - sg(x_G - g) ||^2``, averaged over the batch: its gradient in ``x_G`` is ``g / D``."""
    target = (x_generated - direction).detach()
    return 0.5 * (x_generated - target).flatten(1).pow(2).mean(1).mean()


def fake_score_loss(fake_score: Denoiser, x_generated: Tensor, sigma: Tensor, cond, generator: torch.Generator,
                    sigma_data: float) -> Tensor:
    """``mean lambda(sigma) mean_D || D_fake(sg x_G + sigma eps, sigma) - sg x_G ||^2``, EDM-weighted."""
    x_generated = x_generated.detach()
    error = (fake_score(noised(x_generated, sigma, generator), sigma, cond) - x_generated).flatten(1).pow(2).mean(1)
    return (edm_weight(sigma, sigma_data) * error).mean()


def karras_position_sigma(batch: int, generator: torch.Generator, like: Tensor, low: float = 0.0,
                          high: float = 1.0) -> Tensor:
    """``batch`` levels at positions ``r ~ U[low, high)`` along EDM's continuous Karras schedule (rho 7, ``r = 0``
    is 80, ``r = 1`` is 0.002): SiD's generator levels, ``u ~ U[0, t_max / 1000]`` at ``r = 1 - u``."""
    r = low + (high - low) * torch.rand(batch, generator=generator, device=like.device, dtype=torch.float64)
    hi, lo = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return ((hi + r * (lo - hi)) ** RHO).to(like.dtype)


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its parameters' gradients off: a forward pass inside still differentiates in its input."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


LOGIT_RANGE = (-10.0, 10.0)
RATIO_RANGE = (0.1, 20.0)

# h(r) = f''(r) r^2 up to a constant factor, for each divergence D_f(p_teacher || q_student) = E_q f(p / q).
WEIGHTINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "reverse_kl": torch.ones_like,
    "forward_kl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "squared_hellinger": torch.sqrt,
    "jeffreys": lambda r: 1 + r,
    "sf": lambda r: 1 / (1 + r),
    "neyman": lambda r: 1 / r,
}


def check_divergence(divergence: str, gan_critic_weight: float) -> None:
    """Refuse an unknown divergence, or one weighted by a density ratio without the discriminator that estimates it
    (only reverse KL needs none)."""
    if divergence not in WEIGHTINGS:
        raise ConfigError(f"method_args.divergence must be one of {', '.join(WEIGHTINGS)}, got {divergence!r}")
    if divergence != "reverse_kl" and gan_critic_weight == 0:
        raise ConfigError("method_args.gan_critic_weight must be > 0: the discriminator estimates the density ratio "
                          f"that divergence {divergence!r} needs (only reverse_kl needs none)")


def density_ratio(logit: Tensor) -> Tensor:
    """``r = p_teacher / q_student`` from a discriminator's logit: ``exp`` of the logit clamped to [-10, 10], then
    clamped to [0.1, 20]."""
    return logit.clamp(*LOGIT_RANGE).exp().clamp(*RATIO_RANGE)
