"""Shared math of the flow-map methods (MeanFlow, flow-map distillation with and without data): a two-time student
read as a flow map on the rectified-flow path, its average velocity, the teacher's velocity, time draws, tangents
and the loss weights.

Coordinates: the rectified-flow path ``z_t = (1 - t) x0 + t eps`` (``t = 1`` is noise), as in MeanFlow and Align
Your Flow. The student is a :class:`~fewstep.models.denoiser.TwoTimeDenoiser` in the VE coordinate
``x = z / (1 - t)`` at level ``sigma(t) = t / (1 - t)``, built with ``target_time = "flow_time"`` (its target-time
input is then exactly the flow time ``r``). Its average velocity and flow map are::

    u(z, r, t) = (z - g(z / (1 - t), sigma(t), sigma(r))) / t            r <= t
    X(z, t, r) = z - (t - r) u(z, r, t)

``X`` is CTM's jump ``G(x, sigma_t, sigma_r) = (sigma_r/sigma_t) x + (1 - sigma_r/sigma_t) g`` read on this path
(``X = (1 - r) G``), so the ``flow_map`` sampler (:func:`~fewstep.solvers.sample_flow_map`) jumps with it.
``X(z, t, t) = z`` exactly, and ``u(z, t, t) = (z - g(x, sigma_t, sigma_t)) / t`` is the instantaneous velocity
``eps - x0`` of the denoiser on the diagonal; the teacher's velocity ``v(z, t)`` is the same expression of its
denoiser. The division is by ``t``, never by ``t - r``, so ``r = t`` needs no special case. Times stay in
``[T_MIN, T_MAX]``, the flow times of the VE levels 0.002 and 80.

Derivatives (:mod:`fewstep.jvp`, forward mode or central finite differences) are taken without gradient:

* ``du/dt`` along the teacher's ODE: the JVP of ``u`` in ``(z, t)`` with tangent ``(v, 1)``, ``r`` fixed
  (MeanFlow's identity ``u = v - (t - r) du/dt``; the Eulerian flow-map condition ``dX/dt = 0``);
* ``du/dr``: the JVP in ``r`` alone (the Lagrangian condition ``dX/dr = v(X, r)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fewstep.errors import ConfigError
from fewstep.jvp import jvp
from fewstep.methods.base import teacher_backbone_copy
from fewstep.models.denoiser import Denoiser, TwoTimeDenoiser
from fewstep.nets import add_extra_conditions
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, solver_sigmas

T_MIN, T_MAX = SIGMA_MIN / (1 + SIGMA_MIN), SIGMA_MAX / (1 + SIGMA_MAX)


def build_flow_map_student(teacher: Denoiser, new_backbone: Callable[[], nn.Module],
                           sigma_data: float) -> TwoTimeDenoiser:
    """The teacher's network (or a new one) with the target time as a zero-initialised extra input, read as flow
    time (smooth at 0): it starts as the teacher's DDIM jump for every target time."""
    backbone = teacher_backbone_copy(teacher) or new_backbone()
    return TwoTimeDenoiser(add_extra_conditions(backbone, 1), sigma_data, target_time="flow_time")


def check_flow_map_student(name: str, student: Denoiser) -> None:
    """Refuse a student that is not a two-time denoiser with a flow-time target input."""
    if not isinstance(student, TwoTimeDenoiser) or student.target_time != "flow_time":
        raise ConfigError(f"{name} needs a TwoTimeDenoiser student with target_time='flow_time' (build_student "
                          f"makes one), got {type(student).__name__}")


class DiagonalDenoiser(Denoiser):
    """A two-time network read on its diagonal, ``D(x, sigma) = g(x, sigma, sigma)``: a plain denoiser (a flow-map
    student's instantaneous velocity, or a fake score kept as a copy of one)."""

    def __init__(self, two_time: TwoTimeDenoiser):
        super().__init__()
        self.two_time = two_time
        self.data_shape, self.num_classes = two_time.data_shape, two_time.num_classes

    def forward(self, x, s, cond=None):
        return self.two_time(x, s, cond, s)


def ve_sigma(t: Tensor) -> Tensor:
    """The VE level ``t / (1 - t)`` of flow time ``t``."""
    return t / (1 - t)


def flow_time(sigma: Tensor) -> Tensor:
    """The flow time ``sigma / (1 + sigma)`` of VE level ``sigma``."""
    return sigma / (1 + sigma)


def velocity(denoiser: Denoiser, z: Tensor, t: Tensor, cond=None) -> Tensor:
    """The probability-flow velocity ``dz/dt = (z - D(z / (1 - t), sigma(t))) / t`` of a denoiser (the teacher)."""
    x0 = denoiser(z / bcast(1 - t, z), ve_sigma(t), cond)
    return (z - x0) / bcast(t, z)


def average_velocity(student: Denoiser, z: Tensor, r: Tensor, t: Tensor, cond=None) -> Tensor:
    """``u(z, r, t) = (z - g(z / (1 - t), sigma(t), sigma(r))) / t`` of a two-time student."""
    g = student(z / bcast(1 - t, z), ve_sigma(t), cond, ve_sigma(r))
    return (z - g) / bcast(t, z)


def flow_map(student: Denoiser, z: Tensor, t: Tensor, r: Tensor, cond=None) -> Tensor:
    """``X(z, t, r) = z - (t - r) u(z, r, t)``: the student's jump from flow time ``t`` to ``r``."""
    return z - bcast(t - r, z) * average_velocity(student, z, r, t, cond)


def noised(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``z_t = (1 - t) x0 + t eps``."""
    return bcast(1 - t, x0) * x0 + bcast(t, x0) * eps


def logit_normal(batch: int, generator: torch.Generator, like: Tensor, p_mean: float, p_std: float) -> Tensor:
    """``sigmoid(p_mean + p_std n)``, ``n ~ N(0, 1)``, clamped to ``[T_MIN, T_MAX]``."""
    n = torch.randn(batch, generator=generator, device=like.device, dtype=like.dtype)
    return torch.sigmoid(p_mean + p_std * n).clamp(T_MIN, T_MAX)


def draw_times(batch: int, generator: torch.Generator, like: Tensor, p_mean: float, p_std: float,
               target_p_mean: float, target_p_std: float, share: float) -> tuple[Tensor, Tensor]:
    """``(t, r)``, ``r <= t``: a logit-normal ``(p_mean, p_std)`` draw and a ``(target_p_mean, target_p_std)`` one,
    sorted; then ``r = t`` except for a ``share`` of the batch (MeanFlow's ratio of ``r != t``)."""
    a = logit_normal(batch, generator, like, p_mean, p_std)
    b = logit_normal(batch, generator, like, target_p_mean, target_p_std)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    apart = torch.rand(batch, generator=generator, device=like.device) < share
    return t, torch.where(apart, r, t)


def time_derivative(student: Denoiser, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond, method: str,
                    eps: float) -> tuple[Tensor, Tensor]:
    """``(u, du/dt)`` with ``du/dt = v . grad_z u + d_t u`` at fixed ``r`` (a JVP), without gradient.

    The tangent is scaled per sample by ``h = t (1 - t)`` and the result divided by it, so a finite difference
    steps ``t`` by ``eps`` relative to its distance from either end (where ``sigma(t)`` and the velocity change
    fastest); forward mode is unchanged by the scaling."""
    h = t * (1 - t)
    with torch.no_grad():
        u, scaled = jvp(lambda z_, t_: average_velocity(student, z_, r, t_, cond), (z, t), (bcast(h, v) * v, h),
                        method=method, eps=eps)
        return u, scaled / bcast(h, scaled)


def target_time_derivative(student: Denoiser, z: Tensor, r: Tensor, t: Tensor, cond, method: str,
                           eps: float) -> tuple[Tensor, Tensor]:
    """``(u, du/dr)`` at fixed ``(z, t)`` (a JVP in the target time), without gradient."""
    with torch.no_grad():
        return jvp(lambda r_: average_velocity(student, z, r_, t, cond), (r,), (torch.ones_like(r),),
                   method=method, eps=eps)


def eulerian_residual(student: Denoiser, teacher: Denoiser, z: Tensor, r: Tensor, t: Tensor, cond, ramp: float,
                      method: str, eps: float) -> Tensor:
    """``dX/dt`` along the teacher's ODE at fixed ``r``, ``= v - u - ramp (t - r) du/dt`` with ``v`` the teacher's
    velocity at ``(z, t)``: zero for the exact flow map (``ramp = 1``); ``u_tgt - u`` of MeanFlow's target. No
    gradient."""
    with torch.no_grad():
        v = velocity(teacher, z, t, cond)
        u, dudt = time_derivative(student, z, r, t, v, cond, method, eps)
        return v - u - ramp * bcast(t - r, z) * dudt


def lagrangian_residual(student: Denoiser, teacher: Denoiser, z: Tensor, r: Tensor, t: Tensor, cond, ramp: float,
                        method: str, eps: float) -> Tensor:
    """``v(X, r) - dX/dr`` at fixed ``(z, t)``, ``= v(X, r) - u + ramp (t - r) du/dr`` with ``X = X(z, t, r)`` the
    student's own jump and ``v`` the teacher's velocity there (read at ``max(r, T_MIN)``): zero for the exact flow
    map (``ramp = 1``). No gradient."""
    with torch.no_grad():
        u, dudr = target_time_derivative(student, z, r, t, cond, method, eps)
        landed = z - bcast(t - r, z) * u
        return velocity(teacher, landed, r.clamp(min=T_MIN), cond) - u + ramp * bcast(t - r, z) * dudr


def adaptive_loss(prediction: Tensor, target: Tensor, p: float, c: float) -> Tensor:
    """MeanFlow's adaptively weighted loss ``mean sg(w) ||prediction - target||^2`` with
    ``w = 1 / (||prediction - target||^2 + c)^p`` per sample (``p = 0``: plain squared error)."""
    squared = (prediction - target).flatten(1).pow(2).sum(1)
    weight = 1.0 / (squared.detach() + c) ** p
    return (weight * squared).mean()


def normalised(g: Tensor, c: float) -> Tensor:
    """``g / (||g|| + c)`` per sample (sCM's tangent normalisation)."""
    return g / bcast(g.flatten(1).norm(dim=1) + c, g)


def regression_to(prediction: Tensor, direction: Tensor) -> Tensor:
    """``mean ||prediction - sg(prediction + direction)||^2``: its gradient in ``prediction`` is ``-2 direction``
    per sample, whatever ``direction``'s scale (the value is ``||direction||^2``)."""
    return (prediction - (prediction + direction).detach()).flatten(1).pow(2).sum(1).mean()


def flow_map_sampling(nfe: int) -> Sampling:
    """Jumps of the flow map down ``nfe`` Karras levels from ``SIGMA_MAX`` to 0 (the levels CTM uses)."""
    return Sampling("flow_map", solver_sigmas("euler", nfe).tolist())
