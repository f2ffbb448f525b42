"""Consistency Trajectory Models (CTM). Kim et al., "Consistency Trajectory Models: Learning Probability Flow
ODE Trajectory of Diffusion", ICLR 2024.

The student is an anytime-to-anytime jump along the teacher's probability-flow ODE,
``G_theta(x, t, s) = (s/t) x + (1 - s/t) g_theta(x, t, s)`` for ``s <= t``, so ``G(x, t, t) = x``; ``g`` is
a :class:`~fewstep.models.denoiser.TwoTimeDenoiser` (the teacher's network with the target time ``s`` as a
zero-initialised extra condition, so it starts as the teacher's DDIM jump). On the Karras grid
``s_0 > ... > s_{N-1} = s_min`` followed by ``s_N = 0``, per sample ``t = s_i`` (``i < N-1``),
``u = s_j`` with ``j = min(i + teacher_steps, N-1)`` and ``s = s_k`` with ``k ~ U{j, ..., N}``::

    x_t    = x0 + t eps                                                  (real data x0)
    x_u    = Heun_teacher(x_t, t -> u)                                   (j - i teacher Heun steps on the grid)
    pred   = G_sg(G_theta(x_t, t, s), s, 0)
    target = G_sg(sg G_theta-(x_u, u, s), s, 0)
    L      = E[ d(pred, target) ] + dsm_weight E[ lambda(t) |g_theta(x_t, t, t) - x0|^2 ]
    theta- <- mu theta- + (1 - mu) theta                                 (EMA target network)

``G_sg`` is the student with its current weights under stop-gradient (the gradient still flows through its
input), ``d`` the pseudo-Huber or squared L2 distance of :mod:`fewstep.methods.losses` and
``lambda(t) = (t^2 + sd^2) / (t sd)^2`` EDM's weight. ``g(x, t, t)`` is the denoiser, so the second term is
denoising score matching. With ``s = 0`` the first term is CD's loss for the consistency function
``f(x, t) = G(x, t, 0)``. Sampling jumps ``x <- G(x, s_k, s_{k+1})`` on Karras levels ending at 0
(:func:`~fewstep.solvers.sample_flow_map`); ``sampling_gamma = 1`` instead jumps to 0 and re-noises (CTM's
gamma-sampling at gamma = 1, i.e. consistency sampling).

Deviations from the paper: no GAN term (out of scope here) and no feature network: "feature space" is
the student's own map to time 0, as above, not LPIPS or a classifier; the DSM term reuses the consistency
term's ``x_t`` (grid times) instead of EDM's log-normal times; gamma-sampling is offered only at gamma = 0
and 1, because a sampling spec carries no gamma (``sample_flow_map(..., gamma=...)`` takes any).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fewstep import conditions
from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.base import DistillationMethod, MethodConfig, teacher_backbone_copy
from fewstep.methods.losses import (
    DISTANCES,
    check_choice,
    check_rate,
    default_huber_c,
    distance,
    edm_weight,
    ema_update_,
    squared_l2,
    target_copy,
)
from fewstep.models.denoiser import Denoiser, TwoTimeDenoiser
from fewstep.nets import add_extra_conditions
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, append_zero, heun_step, karras_sigmas, solver_sigmas


@dataclass
class CTMConfig(MethodConfig):
    num_scales: int = 18
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    teacher_steps: int = 1
    target_ema: float = 0.95
    distance: str = "pseudo_huber"
    huber_c: float | None = None
    dsm_weight: float = 1.0
    sampling_gamma: float = 0.0


class ConsistencyTrajectory(DistillationMethod):
    name = "ctm"
    family = "trajectory"
    paper = "Kim et al. 2023, Consistency Trajectory Models"
    fsdp_refusal = ("its frozen-student term calls the student with detached weights (torch.func.functional_call), "
                    "which bypasses FSDP's gathering of sharded weights")
    Config = CTMConfig

    def __init__(self, teacher: Denoiser, student: TwoTimeDenoiser, config: CTMConfig):
        super().__init__(teacher, student, config)
        check_choice("distance", config.distance, DISTANCES)
        check_rate("target_ema", config.target_ema)
        if config.num_scales < 2:
            raise ConfigError(f"method_args.num_scales must be >= 2, got {config.num_scales}")
        if config.teacher_steps < 1:
            raise ConfigError(f"method_args.teacher_steps must be >= 1, got {config.teacher_steps}")
        if config.dsm_weight < 0:
            raise ConfigError(f"method_args.dsm_weight must be >= 0, got {config.dsm_weight}")
        if config.sampling_gamma not in (0.0, 1.0):
            raise ConfigError(f"method_args.sampling_gamma must be 0 (deterministic jumps) or 1 (re-noising), "
                              f"got {config.sampling_gamma}")
        self.target = target_copy(student)
        grid = karras_sigmas(config.num_scales, config.sigma_min, config.sigma_max, config.rho, dtype=torch.float32)
        self.register_buffer("grid", append_zero(grid))  # N positive levels, then 0
        self.huber_c = default_huber_c(student, config.huber_c)

    @classmethod
    def build_student(cls, teacher: Denoiser, config: CTMConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> TwoTimeDenoiser:
        """The teacher's network (or a new one) with the target time as a zero-initialised extra condition."""
        backbone = teacher_backbone_copy(teacher) or new_backbone()
        return TwoTimeDenoiser(add_extra_conditions(backbone, 1), sigma_data)

    @staticmethod
    def jump(g: Callable[..., Tensor], x: Tensor, t: Tensor, s: Tensor, cond) -> Tensor:
        """``G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s)``, and exactly ``x`` where ``s = t`` (also ``t = 0``)."""
        same = s == t
        t_safe = torch.where(same, torch.ones_like(t), t)
        ratio = bcast(s / t_safe, x)
        same = same.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(same, x, ratio * x + (1 - ratio) * g(x, t_safe, cond, s))

    def frozen_student(self, x: Tensor, t: Tensor, cond, s: Tensor) -> Tensor:
        """The student's ``g`` with its current weights held fixed: gradients reach ``x`` but no parameter."""
        weights = {name: p.detach() for name, p in self.student.named_parameters()}
        return functional_call(self.student, weights, (x, t, cond, s))

    def teacher_step(self, x: Tensor, s: Tensor, s_next: Tensor, cond) -> Tensor:
        """One Heun step of the teacher's probability-flow ODE from ``s`` to ``s_next`` (both > 0; equal levels
        leave ``x`` unchanged)."""
        return heun_step(lambda y, level: self.teacher(y, level, cond), x, s, s_next)

    def teacher_solve(self, x: Tensor, start: Tensor, stop: Tensor, cond) -> Tensor:
        """Heun steps along the grid from index ``start`` to ``stop`` (per sample, at most ``teacher_steps``;
        a sample already at ``stop`` takes a step of zero length)."""
        for k in range(self.config.teacher_steps):
            here, there = torch.minimum(start + k, stop), torch.minimum(start + k + 1, stop)
            x = self.teacher_step(x, self.grid[here].to(x), self.grid[there].to(x), cond)
        return x

    def draw_times(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Grid indices ``i < j <= k`` of ``t``, ``u`` and ``s`` (``k = N`` is time 0)."""
        n = self.config.num_scales
        i = torch.randint(0, n - 1, (batch,), generator=generator, device=self.grid.device)
        j = torch.clamp(i + self.config.teacher_steps, max=n - 1)
        k = j + (torch.rand(batch, generator=generator, device=self.grid.device) * (n + 1 - j)).long()
        return i, j, torch.clamp(k, max=n)

    def ctm_losses(self, x0: Tensor, cond, eps: Tensor, i: Tensor, j: Tensor, k: Tensor) -> dict[str, Tensor]:
        """The soft consistency and DSM terms for given noise and grid indices (see the module docstring)."""
        t, u, s = (self.grid[index].to(x0) for index in (i, j, k))
        zero = torch.zeros_like(s)
        x_t = x0 + bcast(t, x0) * eps
        with torch.no_grad():
            x_u = self.teacher_solve(x_t, i, j, cond)
            target = self.jump(self.frozen_student, self.jump(self.target, x_u, u, s, cond), s, zero, cond)
        use_dsm = self.config.dsm_weight > 0
        if use_dsm:  # one pass for G(x_t, t, s) and g(x_t, t, t)
            both = self.student(torch.cat([x_t, x_t]), torch.cat([t, t]), None if cond is None else
                                conditions.cat(cond, cond), torch.cat([s, t]))
            g_ts, denoised = both.chunk(2)
        else:
            g_ts = self.student(x_t, t, cond, s)
        ratio = bcast(s / t, x_t)
        jumped = ratio * x_t + (1 - ratio) * g_ts
        prediction = self.jump(self.frozen_student, jumped, s, zero, cond)
        consistency = distance(prediction, target, self.config.distance, self.huber_c).mean()
        losses = {"consistency": consistency}
        loss = consistency
        if use_dsm:
            losses["dsm"] = (edm_weight(t, self.student.sigma_data) * squared_l2(denoised, x0)).mean()
            loss = loss + self.config.dsm_weight * losses["dsm"]
        return {"loss": loss, **losses}

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0 = batch.x0
        i, j, k = self.draw_times(x0.shape[0], generator)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0)
        return self.ctm_losses(x0, batch.cond, eps, i, j, k)

    def after_update(self, phase: str, step: int) -> bool:
        ema_update_(self.target, self.student, self.config.target_ema)
        return False

    def sampling(self, nfe: int) -> Sampling:
        c = self.config
        levels = solver_sigmas("euler", nfe, c.sigma_min, c.sigma_max, c.rho).tolist()  # nfe levels, then 0
        if c.sampling_gamma == 1.0:
            return Sampling("consistency", levels[:-1])
        return Sampling("flow_map", levels)
