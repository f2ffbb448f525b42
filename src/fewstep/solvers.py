"""Samplers: plain functions over a denoiser callable ``denoise(x, s) -> x0`` (k-diffusion style).

All samplers work in the path-free VE coordinate ``x = x0 + s eps`` and integrate the probability-flow ODE
``dx/ds = (x - D(x, s)) / s`` along a decreasing list of noise levels ``sigmas`` (ending at 0, or at a
small ``s_min`` whose state is returned as the sample). Since every noising path is the same ODE after
SNR matching, one sampler serves every teacher; DDIM is :func:`sample_euler` in this coordinate.

Every sampler is built from two step helpers that methods share too: :func:`euler_step` (DDIM) and
:func:`heun_step` (EDM's second order). Teacher solvers (training-free baselines, :func:`solve`): ``euler``,
``heun``, ``dpmpp_2m`` (DPM-Solver++(2M)). Students: ``euler`` on the student's own grid (deterministic
multi-step, e.g. PD), ``consistency`` (denoise, then re-noise with fresh noise, Song et al. 2023) and
``flow_map`` (jumps of a two-time student ``denoise(x, s, s_next)``, e.g. CTM). Every sampler takes a
``callback(level, x)`` that sees the state at each level, which trajectory metrics read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fewstep.paths import bcast

Denoise = Callable[..., Tensor]
Callback = Callable[[float, Tensor], None]

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
DEFAULT_TEACHER_NFE = 35  # Heun with 18 levels: EDM's default budget, the reference of reported speedups


@dataclass
class Sampling:
    """How a model draws samples at one NFE, as data: a sampler of :data:`SAMPLERS` and its levels."""

    sampler: str
    sigmas: list[float] = field(default_factory=list)


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO, dtype: torch.dtype = torch.float64) -> Tensor:
    """``n`` noise levels from ``sigma_max`` down to ``sigma_min``, evenly spaced in ``s^(1/rho)`` (EDM)."""
    if n < 1:
        raise ValueError(f"need at least one noise level, got n={n}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=dtype)
    ramp = torch.linspace(0, 1, n, dtype=dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _level(s: Tensor | float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(s), dtype=x.dtype, device=x.device)


def euler_step(denoise: Denoise, x: Tensor, s: Tensor, s_next: Tensor) -> Tensor:
    """One first-order (DDIM) step of the probability-flow ODE from ``s`` to ``s_next`` (per-sample levels
    ``(B,)``, ``s > 0``): ``x0 + (s_next / s)(x - x0)`` with ``x0 = denoise(x, s)``; one evaluation."""
    x0 = denoise(x, s)
    return x0 + bcast(s_next / s, x) * (x - x0)


def heun_step(denoise: Denoise, x: Tensor, s: Tensor, s_next: Tensor) -> Tensor:
    """One step of EDM's second-order Heun method from ``s`` to ``s_next`` (per-sample levels ``(B,)``, both
    positive): an Euler predictor along ``d = (x - D(x, s)) / s``, then the average of the slopes at both ends;
    two evaluations."""
    d = (x - denoise(x, s)) / bcast(s, x)
    x_euler = x + bcast(s_next - s, x) * d
    d_next = (x_euler - denoise(x_euler, s_next)) / bcast(s_next, x)
    return x + bcast(s_next - s, x) * 0.5 * (d + d_next)


def _report(callback: Callback | None, s: Tensor | float, x: Tensor) -> None:
    if callback is not None:
        callback(float(s), x)


@torch.no_grad()
def sample_euler(denoise: Denoise, x: Tensor, sigmas: Tensor, generator=None, callback: Callback | None = None
                 ) -> Tensor:
    """First-order (DDIM) integration; one network evaluation per step."""
    _report(callback, sigmas[0], x)
    for s, s_next in itertools.pairwise(sigmas):
        x = euler_step(denoise, x, _level(s, x), _level(s_next, x))
        _report(callback, s_next, x)
    return x


@torch.no_grad()
def sample_heun(denoise: Denoise, x: Tensor, sigmas: Tensor, generator=None, callback: Callback | None = None,
                euler_tail: int = 0) -> Tensor:
    """EDM's Heun method: a second-order step between positive levels, a first-order step onto ``s = 0`` (EDM's
    last step: a corrector there would divide by a level near 0). ``euler_tail`` makes that many steps at the end
    first-order (the step onto 0 among them): two are how an even number of evaluations is spent (:func:`solve`)."""
    _report(callback, sigmas[0], x)
    first_order_from = len(sigmas) - 1 - euler_tail
    for i, (s, s_next) in enumerate(itertools.pairwise(sigmas)):
        level, level_next = _level(s, x), _level(s_next, x)
        if s_next > 0 and i < first_order_from:
            x = heun_step(denoise, x, level, level_next)
        else:
            x = euler_step(denoise, x, level, level_next)
        _report(callback, s_next, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoise, x: Tensor, sigmas: Tensor, generator=None,
                    callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep second order in ``lambda = -log s``, one evaluation a step.

    Each step is ``x' = (s'/s) x + (1 - s'/s) D~`` where ``D~`` extrapolates the last two denoised outputs
    linearly in ``lambda``; the first step and a step onto ``s = 0`` use ``D~ = D``."""
    _report(callback, sigmas[0], x)
    previous, h_previous = None, None
    for s, s_next in itertools.pairwise(sigmas):
        x0 = denoise(x, _level(s, x))
        if s_next == 0:
            x = x0
            _report(callback, s_next, x)
            break
        h = math.log(s / s_next)
        x0_extrapolated = x0
        if previous is not None:
            r = h_previous / h
            x0_extrapolated = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
        x = (s_next / s) * x + (1 - s_next / s) * x0_extrapolated
        previous, h_previous = x0, h
        _report(callback, s_next, x)
    return x


@torch.no_grad()
def sample_consistency(denoise: Denoise, x: Tensor, sigmas: Tensor,
                       generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """Multistep consistency sampling: ``x0 = f(x, s_i)``, then ``x = x0 + s_{i+1} z`` with fresh noise.

    ``sigmas`` lists the levels evaluated (a trailing 0 is ignored): one network evaluation each. ``callback``
    sees the state at each level (the re-noised ones), then the sample at level 0."""
    levels = [float(s) for s in sigmas if s > 0]
    x0 = x
    _report(callback, levels[0], x)
    for i, s in enumerate(levels):
        x0 = denoise(x, _level(s, x))
        if i + 1 < len(levels):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x0 + levels[i + 1] * z
            _report(callback, levels[i + 1], x)
    _report(callback, 0.0, x0)
    return x0


@torch.no_grad()
def sample_flow_map(denoise: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor,
                    generator: torch.Generator | None = None, callback: Callback | None = None,
                    gamma: float = 0.0) -> Tensor:
    """Jumps of a flow map ``G(x, s, s') = (s'/s) x + (1 - s'/s) g(x, s, s')`` down ``sigmas``, with the
    two-time output ``g = denoise(x, s, s')``: one network evaluation per jump.

    ``gamma`` is CTM's gamma-sampling (Kim et al. 2023): jump to ``s'' = sqrt(1 - gamma^2) s'``, then add
    fresh noise ``gamma s' z``. ``gamma = 0`` (the default) is deterministic; ``gamma = 1`` jumps to 0 and
    re-noises, which is :func:`sample_consistency` with ``denoise(x, s, 0)``."""
    _report(callback, sigmas[0], x)
    for s, s_next in itertools.pairwise(sigmas):
        target = math.sqrt(1.0 - gamma**2) * s_next
        x0 = denoise(x, _level(s, x), _level(target, x))
        x = x0 + (target / s) * (x - x0)
        if gamma > 0 and s_next > 0:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + gamma * s_next * z
        _report(callback, s_next, x)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "consistency": sample_consistency,
    "flow_map": sample_flow_map,
}
TEACHER_SOLVERS = ("euler", "heun", "dpmpp_2m")


def solver_sigmas(solver: str, nfe: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> Tensor:
    """The Karras levels on which ``solver`` spends exactly ``nfe`` network evaluations (see :func:`solve`).

    Every schedule ends with a step onto 0 and takes its positive levels from the ``n + 1``-level Karras ramp
    without its last level ``sigma_min``: an evaluation at ``sigma_min`` only re-denoises an almost clean
    sample, so spending one there makes a few-step baseline needlessly weak (at 2 NFE on the 8-mode ring it
    triples the excess NLL). Euler and DPM-Solver++(2M): ``nfe`` levels then 0. Heun: ``n`` levels then 0, with
    ``n - 1`` second-order steps and a first-order last step, for odd ``nfe = 2n - 1``; for even ``nfe = 2n - 2``
    the step before the last is first-order too (at low noise, where a tight mixture's denoiser turns sharply and
    a coarse corrector overshoots; a first-order first step instead measured worse on the exact ring)."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if solver in ("euler", "dpmpp_2m"):
        levels = nfe
    elif solver == "heun":
        levels = nfe // 2 + 1
    else:
        raise ValueError(f"unknown teacher solver {solver!r}; choose one of {TEACHER_SOLVERS}")
    return append_zero(karras_sigmas(levels + 1, sigma_min, sigma_max, rho)[:-1])


def count_nfe(sampler: str, sigmas: Tensor) -> int:
    """Network evaluations ``sampler`` spends on ``sigmas`` (Heun: as :func:`sample_heun` by default)."""
    steps = list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True))
    if sampler == "heun":
        return sum(2 if nxt > 0 else 1 for _, nxt in steps)
    if sampler == "consistency":
        return int((sigmas > 0).sum())
    return len(steps)


def sample(denoise: Denoise, noise: Tensor, sampler: str, sigmas: Tensor, generator: torch.Generator | None = None,
           callback: Callback | None = None, **options) -> Tensor:
    """Draw samples: scale standard-normal ``noise`` to ``sigmas[0]`` and run ``sampler`` down ``sigmas``
    (``options`` go to the sampler, e.g. Heun's ``euler_tail``)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    sigmas = sigmas.to(device=noise.device, dtype=noise.dtype)
    return SAMPLERS[sampler](denoise, noise * sigmas[0], sigmas, generator=generator, callback=callback, **options)


def solve(denoise: Denoise, noise: Tensor, solver: str, nfe: int, callback: Callback | None = None,
          sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """Samples of a training-free ``solver`` (one of :data:`TEACHER_SOLVERS`) at exactly ``nfe`` evaluations,
    on the levels of :func:`solver_sigmas`."""
    sigmas = solver_sigmas(solver, nfe, sigma_min, sigma_max, rho)
    options = {"euler_tail": 2} if solver == "heun" and nfe % 2 == 0 else {}
    return sample(denoise, noise, solver, sigmas, callback=callback, **options)


def ode_endpoint(denoise: Denoise, noise: Tensor, steps: int = 256, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX) -> Tensor:
    """A high-accuracy probability-flow ODE solution from ``noise`` (Heun, ``steps`` levels, then 0).

    With an analytic teacher and float64 this is the exact flow map to within the integration error,
    which :func:`fewstep.eval` reports by comparing against half as many steps."""
    sigmas = append_zero(karras_sigmas(steps, sigma_min, sigma_max))
    return sample(denoise, noise, "heun", sigmas)
