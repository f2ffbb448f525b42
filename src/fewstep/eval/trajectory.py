"""How straight a sampler's trajectories are, in the rectified-flow coordinate that reflow straightens.

Samplers run in the VE coordinate ``x = x0 + s eps`` (:mod:`fewstep.solvers`). The rectified-flow path
``z_t = (1 - t) x0 + t eps`` is the same curve seen through ``t = s / (1 + s)`` and ``z = x / (1 + s)``
(data at ``t = 0``, noise at ``t = 1``), so the recorded states ``x_k`` at levels ``s_k`` become points
``(t_k, z_k)``. With ``s_0 = 80`` the record spans ``t`` in ``[t_end, t_start] = [0, 80/81]``; a DDIM (Euler) step is
exactly a straight segment in these coordinates, so the piecewise-linear path through the points is the
path an Euler sampler travels.

* :func:`straightness` (Liu et al. 2022): the time average over the span ``T = t_start - t_end`` of the squared
  distance between the path's velocity and its mean velocity, ``v = (z_start - z_end) / T``::

      S = E_b (1/T) int ||v - dz/dt||^2 dt = E_b (1/T) sum_k dt_k ||v - dz_k / dt_k||^2

  (the second form for the piecewise-linear path; ``||.||`` is the Euclidean norm over all coordinates of one
  sample, raw units of ``z``, not divided by the dimension). Over ``[0, 1]`` this is Liu et al.'s ``S`` with
  ``v = z_1 - z_0``. ``S = 0`` iff every path is a straight segment travelled at constant speed in ``t``.
* :func:`curvature`: the largest distance of a path's points from the line through its two ends, over the length
  of that chord (the relative sagitta), averaged over samples::

      C = E_b max_k dist(z_k, line(z_start, z_end)) / ||z_start - z_end||

  It ignores speed entirely, so ``C = 0`` iff every path lies on a straight line. A path that runs back along
  its line is not curved: for Gaussian data ``N(0, c^2 I)`` the exact path is ``z_t = sigma_t z_1`` with
  ``sigma_t = sqrt((1 - t)^2 c^2 + t^2)``, which dips below both ends' ``sigma`` and comes back out along the
  same ray, so ``C = 0`` while ``S > 0`` (and a path-length ratio would call that ray curved).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.errors import DataError
from fewstep.solvers import Denoise, sample, solve


class _Recorder:
    """A sampler callback that keeps every ``(level, state)`` it is shown."""

    def __init__(self):
        self.levels: list[float] = []
        self.states: list[Tensor] = []

    def __call__(self, level: float, x: Tensor) -> None:
        self.levels.append(level)
        self.states.append(x.detach().clone())

    def result(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.levels, dtype=torch.float64), torch.stack(self.states)


def record_trajectory(denoise: Denoise, noise: Tensor, sampler: str, sigmas: Tensor,
                      generator: torch.Generator | None = None, **options) -> tuple[Tensor, Tensor]:
    """Run :func:`fewstep.solvers.sample` and return the levels ``(K,)`` (float64) and VE states ``(K, B, *shape)``
    its callback saw, from the start level to the sample."""
    recorder = _Recorder()
    sample(denoise, noise, sampler, sigmas, generator, recorder, **options)
    return recorder.result()


def record_solve(denoise: Denoise, noise: Tensor, solver: str, nfe: int) -> tuple[Tensor, Tensor]:
    """:func:`record_trajectory` for a teacher solver at ``nfe`` evaluations (:func:`fewstep.solvers.solve`)."""
    recorder = _Recorder()
    solve(denoise, noise, solver, nfe, recorder)
    return recorder.result()


def rectified_flow(levels: Tensor, states: Tensor) -> tuple[Tensor, Tensor]:
    """Times ``t = s / (1 + s)`` ``(K,)`` and flattened states ``z = x / (1 + s)`` ``(K, B, d)``, in float64."""
    if levels.ndim != 1 or states.shape[0] != levels.shape[0] or levels.shape[0] < 2:
        raise DataError(f"need K >= 2 levels (K,) and states (K, B, ...), got {tuple(levels.shape)} and "
                        f"{tuple(states.shape)}")
    s = levels.detach().to("cpu", torch.float64)
    if not (s >= 0).all() or not (s[1:] < s[:-1]).all():
        raise DataError(f"levels must be non-negative and strictly decreasing, got {s.tolist()}")
    x = states.detach().to("cpu", torch.float64).reshape(states.shape[0], states.shape[1], -1)
    return s / (1 + s), x / (1 + s)[:, None, None]


def straightness(levels: Tensor, states: Tensor) -> float:
    """Liu et al.'s straightness ``S = E_b (1/T) sum_k dt_k ||v - dz_k/dt_k||^2`` of the piecewise-linear
    rectified-flow path through the recorded states (see the module docstring); raw units of ``|z|^2``."""
    t, z = rectified_flow(levels, states)
    dt = t[:-1] - t[1:]  # (K-1,), positive: the record runs from noise to data
    span = t[0] - t[-1]
    mean_velocity = (z[0] - z[-1]) / span  # (B, d)
    velocity = (z[:-1] - z[1:]) / dt[:, None, None]  # (K-1, B, d)
    per_sample = (dt[:, None] * ((velocity - mean_velocity) ** 2).sum(-1)).sum(0) / span
    return float(per_sample.mean())


def curvature(levels: Tensor, states: Tensor) -> float:
    """Mean relative sagitta ``E_b max_k dist(z_k, line(z_start, z_end)) / ||z_start - z_end||`` of the
    rectified-flow paths (see the module docstring); speed-independent, 0 iff every path lies on a line."""
    _, z = rectified_flow(levels, states)
    chord = z[0] - z[-1]  # (B, d)
    length = chord.norm(dim=-1)
    offset = z - z[-1]  # (K, B, d)
    along = (offset * chord).sum(-1, keepdim=True) / length[:, None] ** 2  # (K, B, 1)
    distance = (offset - along * chord).norm(dim=-1)  # (K, B)
    return float((distance.amax(0) / length).mean())
