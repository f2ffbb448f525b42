"""Phased Consistency Models (PCM). Wang, Song, Zhang, ... & Li, "Phased Consistency Models", NeurIPS 2024.

The noise range is split into ``M`` phases with edges ``e_M = s_max > ... > e_1 > e_0 = s_min`` (the
Karras ramp of ``M + 1`` levels). Within phase ``m`` (``e_m <= s <= e_{m+1}``) the student is a consistency
function to the phase's *lower edge*, not to clean data, written as a DDIM jump of the student's
denoiser ``D_theta`` (an EDM-preconditioned copy of the teacher)::

    f_m(x, s) = D_theta(x, s) + (e_m / s) (x - D_theta(x, s)),     so f_m(x, e_m) = x exactly.

Each phase is cut into ``K = steps_per_phase`` intervals of the fine Karras grid ``g_0 = s_max > ... > g_{MK}
= s_min`` (every ``K``-th level is an edge). With ``i ~ U{0, ..., MK - 1}`` and ``m`` the phase of
``[g_{i+1}, g_i]``::

    x_hi  = x0 + g_i eps                                     (real data x0)
    x_lo  = Solver_teacher(x_hi, g_i -> g_{i+1})              (DDIM by default; the teacher as given, so
                                                              guided when the recipe guides it)
    L     = E[ d( f_m,theta(x_hi, g_i), sg f_m,theta-(x_lo, g_{i+1}) ) ]
    theta- <- mu theta- + (1 - mu) theta                     (EMA target network, as the paper's code)

with ``d`` the pseudo-Huber or squared L2 distance. With ``M = 1`` the only edge is ``s_min`` and this is CD's
loss with the consistency function ``f(x, s) = D + (s_min / s)(x - D)``.

Sampling is deterministic: from ``x = s_max z``, jump ``x <- f_m(x, e_{m+1})`` phase by phase, which is DDIM
with the student's denoiser on the edges (:func:`fewstep.solvers.sample_euler`), one evaluation per phase.
Other NFE use the Karras ramp of ``nfe + 1`` levels: for ``nfe`` dividing ``M`` these are every
``M / nfe``-th edge (coarser nested edges, each jump crossing several phases with the denoiser trained to reach
the nearest edge: an approximation, not what the loss trained); for ``nfe`` a multiple of ``M`` the edges
with DDIM sub-steps inside each phase.

Deviations from the paper: the optional adversarial loss is not implemented; phases and grid are EDM's
Karras schedule instead of DDPM timesteps; ``teacher_solver = "heun"`` is offered besides DDIM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.base import DistillationMethod, MethodConfig
from fewstep.methods.losses import (
    DISTANCES,
    ODE_STEPS,
    check_choice,
    check_rate,
    default_huber_c,
    distance,
    ema_update_,
    ode_step,
    target_copy,
)
from fewstep.models.denoiser import Denoiser
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, karras_sigmas


@dataclass
class PCMConfig(MethodConfig):
    phases: int = 4
    steps_per_phase: int = 8
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = 7.0
    teacher_solver: str = "euler"
    target_ema: float = 0.95
    distance: str = "pseudo_huber"
    huber_c: float | None = None


class PhasedConsistency(DistillationMethod):
    name = "pcm"
    family = "consistency"
    paper = "Wang et al. 2024, Phased Consistency Models"
    Config = PCMConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: PCMConfig):
        super().__init__(teacher, student, config)
        check_choice("distance", config.distance, DISTANCES)
        check_rate("target_ema", config.target_ema)
        check_choice("teacher_solver", config.teacher_solver, ODE_STEPS)
        for key in ("phases", "steps_per_phase"):
            if getattr(config, key) < 1:
                raise ConfigError(f"method_args.{key} must be >= 1, got {getattr(config, key)}")
        self.target = target_copy(student)
        count = config.phases * config.steps_per_phase
        self.register_buffer("grid", karras_sigmas(count + 1, config.sigma_min, config.sigma_max, config.rho,
                                                   dtype=torch.float32))
        self.register_buffer("lower_edge", self.grid[config.steps_per_phase::config.steps_per_phase]
                             .repeat_interleave(config.steps_per_phase))
        self.huber_c = default_huber_c(student, config.huber_c)

    @property
    def edges(self) -> Tensor:
        """Phase edges ``e_M = s_max > ... > e_0 = s_min``."""
        return self.grid[::self.config.steps_per_phase]

    @staticmethod
    def phase_map(denoiser: Denoiser, x: Tensor, s: Tensor, edge: Tensor, cond) -> Tensor:
        """``f(x, s) = D(x, s) + (edge / s)(x - D(x, s))``: the DDIM jump of ``denoiser`` from ``s`` to ``edge``."""
        x0 = denoiser(x, s, cond)
        return x0 + bcast(edge / s, x) * (x - x0)

    def teacher_step(self, x: Tensor, s: Tensor, s_next: Tensor, cond) -> Tensor:
        """The teacher's ODE step from ``s`` to ``s_next`` (adjacent levels of the fine grid)."""
        return ode_step(lambda y, t: self.teacher(y, t, cond), x, s, s_next, self.config.teacher_solver)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond = batch.x0, batch.cond
        index = torch.randint(0, self.grid.shape[0] - 1, (x0.shape[0],), generator=generator, device=x0.device)
        s_hi, s_lo, edge = self.grid[index].to(x0), self.grid[index + 1].to(x0), self.lower_edge[index].to(x0)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0)
        x_hi = x0 + bcast(s_hi, x0) * eps
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, s_hi, s_lo, cond)
            target = self.phase_map(self.target, x_lo, s_lo, edge, cond)
        prediction = self.phase_map(self.student, x_hi, s_hi, edge, cond)
        return {"loss": distance(prediction, target, self.config.distance, self.huber_c).mean()}

    def after_update(self, phase: str, step: int) -> bool:
        ema_update_(self.target, self.student, self.config.target_ema)
        return False

    def sampling(self, nfe: int) -> Sampling:
        levels = karras_sigmas(nfe + 1, self.config.sigma_min, self.config.sigma_max, self.config.rho)
        return Sampling("euler", levels.tolist())
