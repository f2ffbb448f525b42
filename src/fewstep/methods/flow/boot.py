"""BOOT: data-free distillation by bootstrapping. Gu, Zhai, Zhang, Liu & Susskind, "BOOT: Data-free Distillation of
Denoising Diffusion Models with Bootstrapping", 2023.

The student reads only noise: from ``x_T = T eps`` (``T = sigma_max``) it predicts the teacher's ODE state at any
level ``s``. It is written as a flow map (a :class:`~fewstep.models.denoiser.TwoTimeDenoiser` ``g``)::

    G(x, a, s) = (s/a) x + (1 - s/a) g(x, a, s),    s < a

so at the start ``a = T`` the state at ``s`` is ``x_s = s eps + y_s`` with BOOT's signal ``y_s = (1 - s/T) g``:
``y_T = 0`` holds exactly (the boundary), and ``g`` is in the units of a clean sample (the "Signal-ODE": a smooth
target however noisy ``x_s`` is). On a grid ``s_0 = T > ... > s_{N-1} = sigma_min > s_N = 0`` (Karras, rho 7), per
sample a step ``t = s_i -> s = s_{i+1}`` and the bootstrapping loss is::

    x_t    = sg G(x_a, a, t)                          (the student's own state at t; x_a itself when t = a)
    x_s*   = x0 + (s/t)(x_t - x0),  x0 = D(x_t, t)     (one teacher DDIM step)
    g*     = (x_s* - (s/a) x_a) / (1 - s/a)           (the target in the signal units of g)
    L      = E || g(x_a, a, s) - g* ||^2

i.e. from the top, ``|| y_s - sg[ y_t + (1 - s/t)(D(y_t + t eps, t) - y_t) ] ||^2 / (1 - s/T)^2``: the student's
state at ``s`` must be where one teacher step from its own state at ``t`` lands. One teacher evaluation per
sample. One-step sampling is ``G(T eps, T, 0)``; ``nfe`` steps jump along Karras levels
(:func:`~fewstep.solvers.sample_flow_map`).

Deviations from the paper: (1) restarts: with probability ``restart_fraction`` a sample starts not at ``T`` but
at a lower grid level ``a = s_j``, from the student's own state there, ``x_a = sg G(T eps, T, a)`` (still
data-free), and bootstraps the steps below ``a``; the paper's student only starts at pure noise, so it samples in
one call, while with restarts the flow-map sampler's later jumps (2 and 4 NFE) start from states the student was
trained to start from (``restart_fraction = 0`` is the paper's BOOT); (2) the loss is weighted to the units of
``g`` (the paper's weighting of its signal-space loss is not reproduced); (3) levels are our Karras grid in the VE
coordinate, not DDPM timesteps; (4) no classifier-free guidance of its own: a guided teacher is distilled as it is
(``teacher.guidance``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.base import DistillationMethod, MethodConfig, teacher_backbone_copy
from fewstep.methods.losses import check_rate, squared_l2
from fewstep.models.denoiser import Denoiser, TwoTimeDenoiser
from fewstep.nets import add_extra_conditions
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, append_zero, euler_step, karras_sigmas, solver_sigmas


@dataclass
class BOOTConfig(MethodConfig):
    num_scales: int = 18  # positive levels of the bootstrapping grid (then 0)
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    restart_fraction: float = 0.5  # share of samples that start from the student's own state at a lower level


class BOOT(DistillationMethod):
    name = "boot"
    family = "flow"
    paper = "Gu et al. 2023, BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping"
    needs = frozenset({"noise"})
    Config = BOOTConfig

    def __init__(self, teacher: Denoiser, student: TwoTimeDenoiser, config: BOOTConfig):
        super().__init__(teacher, student, config)
        check_rate("restart_fraction", config.restart_fraction)
        if config.num_scales < 2:
            raise ConfigError(f"method_args.num_scales must be >= 2, got {config.num_scales}")
        if not 0 < config.sigma_min < config.sigma_max:
            raise ConfigError(f"method_args: need 0 < sigma_min < sigma_max, got {config.sigma_min} and "
                              f"{config.sigma_max}")
        grid = karras_sigmas(config.num_scales, config.sigma_min, config.sigma_max, config.rho, dtype=torch.float32)
        self.register_buffer("grid", append_zero(grid))  # N positive levels, then 0

    @classmethod
    def build_student(cls, teacher: Denoiser, config: BOOTConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> TwoTimeDenoiser:
        """The teacher's network (or a new one) with the target level as a zero-initialised extra condition, so
        it starts as the teacher's DDIM jump from every level."""
        backbone = teacher_backbone_copy(teacher) or new_backbone()
        return TwoTimeDenoiser(add_extra_conditions(backbone, 1), sigma_data)

    @staticmethod
    def jump(g: Denoiser, x: Tensor, a: Tensor, s: Tensor, cond) -> Tensor:
        """``G(x, a, s) = (s/a) x + (1 - s/a) g(x, a, s)``, and exactly ``x`` where ``s = a``."""
        ratio = bcast(s / a, x)
        return torch.where(ratio == 1, x, ratio * x + (1 - ratio) * g(x, a, cond, s))

    def teacher_step(self, x: Tensor, t: Tensor, s: Tensor, cond) -> Tensor:
        """One teacher DDIM step from ``t`` to ``s``."""
        return euler_step(lambda y, level: self.teacher(y, level, cond), x, t, s)

    def draw_indices(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Grid indices ``j <= i`` of the start ``a = s_j`` and the step's upper level ``t = s_i`` (``s = s_{i+1}``):
        ``j = 0`` (pure noise) unless the sample restarts, then ``j`` uniform below the top."""
        n, device = self.config.num_scales, self.grid.device
        restart = torch.rand(batch, generator=generator, device=device) < self.config.restart_fraction
        j = torch.where(restart, torch.randint(1, n, (batch,), generator=generator, device=device), 0)
        i = j + (torch.rand(batch, generator=generator, device=device) * (n - j)).long()
        return j, torch.clamp(i, max=n - 1)

    def boot_losses(self, noise: Tensor, cond, j: Tensor, i: Tensor) -> dict[str, Tensor]:
        """The bootstrapping loss for given noise and grid indices (see the module docstring)."""
        a, t, s = (self.grid[index].to(noise) for index in (j, i, i + 1))
        sigma_max = torch.full_like(a, self.config.sigma_max)
        with torch.no_grad():
            x_top = self.config.sigma_max * noise
            x_a = self.jump(self.student, x_top, sigma_max, a, cond)
            x_t = self.jump(self.student, x_a, a, t, cond)
            x_s = self.teacher_step(x_t, t, s, cond)
            ratio = bcast(s / a, noise)
            target = (x_s - ratio * x_a) / (1 - ratio)
        loss = squared_l2(self.student(x_a, a, cond, s), target).mean()
        return {"loss": loss}

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        j, i = self.draw_indices(batch.noise.shape[0], generator)
        return self.boot_losses(batch.noise, batch.cond, j, i)

    def sampling(self, nfe: int) -> Sampling:
        c = self.config
        return Sampling("flow_map", solver_sigmas("euler", nfe, c.sigma_min, c.sigma_max, c.rho).tolist())
