"""MeanFlow. Geng, Deng, Bai, Kolter & He, "Mean Flows for One-step Generative Modeling", 2025; its staged recipe
from Hu et al., "MeanFlow Transformers with Representation Autoencoders" (MF-RAE), 2025.

The student is the average velocity ``u(z, r, t)`` of a two-time network on the rectified-flow path
(:mod:`fewstep.methods.flow.maps`): ``z_r = z_t - (t - r) u(z_t, r, t)``. The MeanFlow identity
``u = v - (t - r) du/dt`` (``d/dt = v . grad_z + d_t``, ``r`` fixed) gives its loss::

    t, r   = a logit-normal(p_mean, p_std) and a logit-normal(target_p_mean, target_p_std) draw, sorted;
             r = t except for a share r_neq_t_share of the batch
    z_t    = (1 - t) x0 + t eps                                      (real data x0)
    v      = teacher velocity at (z_t, t)                            (velocity = "teacher": MeanFlow distillation)
           = eps - x0                                                (velocity = "conditional": MeanFlow from data)
    u_tgt  = sg[ v - (t - r) JVP(u_theta; (z_t, t), tangent (v, 1)) ]
    L      = mean sg(w) ||u_theta(z_t, r, t) - u_tgt||^2,   w = 1 / (||u_theta - u_tgt||^2 + c)^p

At ``r = t`` the target is ``v`` and ``L`` is (adaptively weighted) flow matching. The JVP is forward mode or a
central finite difference (``jvp``, :mod:`fewstep.jvp`).

MF-RAE's recipe is three stages of this one method, by share of the run (``total_steps``, fitted to the run):

1. consistency mid-training (``mid_training_share``): roll the teacher's ODE out from noise with Euler on
   ``mid_training_levels`` Karras levels (then 0), and regress ``u(z_i, t_j, t_i)`` on the chord
   ``(z_i - z_j) / (t_i - t_j)`` for ``mid_training_pairs`` random pairs ``i < j`` of each trajectory (plain MSE);
2. MeanFlow distillation with the teacher's velocity (the loss above);
3. bootstrapping (``bootstrap_share``, the run's last part): the same loss with the one-point velocity
   ``eps - x0`` instead of the teacher's.

Each stage starts with fresh optimiser state. The defaults are plain MeanFlow distillation (no stage 1 or 3).
Sampling: ``nfe`` jumps of the flow map down Karras levels (``flow_map`` sampler; one step is
``x = eps - u(eps, 0, 1)`` in the paper's terms).

Deviations from the papers: the network is the teacher's (EDM-preconditioned, copied) with the target time as
one zero-initialised extra input (flow time ``r``), not a (t, t - r) embedding pair; the top time is the flow time
of level 80 (0.988), not 1; no classifier-free guidance inside the target (our recipes' teachers are
unconditional); MF-RAE's squared-SSE loss form is not used (every stage uses MeanFlow's adaptive weight except
mid-training's plain MSE); the mid-training rollout uses our Karras levels instead of MF-RAE's shifted uniform
times.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.jvp import JVP_METHODS
from fewstep.methods.base import DistillationMethod, MethodConfig
from fewstep.methods.flow.maps import (
    adaptive_loss,
    average_velocity,
    build_flow_map_student,
    check_flow_map_student,
    draw_times,
    flow_map_sampling,
    flow_time,
    noised,
    time_derivative,
    velocity,
)
from fewstep.methods.losses import check_choice, check_rate
from fewstep.models.denoiser import Denoiser, TwoTimeDenoiser
from fewstep.paths import bcast
from fewstep.solvers import Sampling, solver_sigmas

VELOCITIES = ("teacher", "conditional")


@dataclass
class MeanFlowConfig(MethodConfig):
    velocity: str = "teacher"
    r_neq_t_share: float = 0.25
    p_mean: float = -0.4
    p_std: float = 1.0
    target_p_mean: float = -0.4
    target_p_std: float = 1.0
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    jvp: str = "auto"
    jvp_eps: float = 1e-3
    total_steps: int = 10000
    mid_training_share: float = 0.0
    mid_training_levels: int = 16
    mid_training_pairs: int = 4
    bootstrap_share: float = 0.0


class MeanFlow(DistillationMethod):
    name = "meanflow"
    family = "flow"
    paper = "Geng et al. 2025, Mean Flows for One-step Generative Modeling (staged: Hu et al. 2025, MF-RAE)"
    Config = MeanFlowConfig

    def __init__(self, teacher: Denoiser, student: TwoTimeDenoiser, config: MeanFlowConfig):
        super().__init__(teacher, student, config)
        check_flow_map_student(self.name, student)
        check_choice("velocity", config.velocity, VELOCITIES)
        check_choice("jvp", config.jvp, JVP_METHODS)
        for key in ("r_neq_t_share", "mid_training_share", "bootstrap_share"):
            check_rate(key, getattr(config, key))
        if config.mid_training_share + config.bootstrap_share > 1:
            raise ConfigError("method_args: mid_training_share + bootstrap_share must be at most 1")
        if min(config.p_std, config.target_p_std, config.adaptive_c, config.jvp_eps) <= 0 or config.adaptive_p < 0:
            raise ConfigError("method_args: need p_std, target_p_std, adaptive_c and jvp_eps > 0 and adaptive_p >= 0")
        if config.total_steps < 1 or config.mid_training_levels < 1 or config.mid_training_pairs < 1:
            raise ConfigError("method_args: need total_steps, mid_training_levels and mid_training_pairs >= 1")

    @classmethod
    def build_student(cls, teacher: Denoiser, config: MeanFlowConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> TwoTimeDenoiser:
        return build_flow_map_student(teacher, new_backbone, sigma_data)

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """The stages are shares of the run."""
        return {"total_steps": steps}

    def stage(self, step: int) -> str:
        """``"mid_training"``, ``"distillation"`` or ``"bootstrap"`` at trainer step ``step``."""
        c = self.config
        if step < c.mid_training_share * c.total_steps:
            return "mid_training"
        if step >= (1 - c.bootstrap_share) * c.total_steps:
            return "bootstrap"
        return "distillation"

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        stage = self.stage(step)
        if stage == "mid_training":
            return self.mid_training_losses(batch.x0, batch.cond, generator)
        return self.meanflow_losses(batch.x0, batch.cond, generator,
                                    conditional=stage == "bootstrap" or self.config.velocity == "conditional")

    def meanflow_losses(self, x0: Tensor, cond, generator: torch.Generator, conditional: bool) -> dict[str, Tensor]:
        c = self.config
        t, r = draw_times(x0.shape[0], generator, x0, c.p_mean, c.p_std, c.target_p_mean,
                              c.target_p_std, c.r_neq_t_share)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0)
        z = noised(x0, eps, t)
        if conditional:
            v = eps - x0
        else:
            with torch.no_grad():
                v = velocity(self.teacher, z, t, cond)
        target = self.meanflow_target(z, r, t, v, cond)
        loss = adaptive_loss(average_velocity(self.student, z, r, t, cond), target, c.adaptive_p, c.adaptive_c)
        return {"loss": loss}

    def meanflow_target(self, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond) -> Tensor:
        """``u_tgt = v - (t - r) du/dt`` with the student's current weights, without gradient."""
        _, dudt = time_derivative(self.student, z, r, t, v, cond, self.config.jvp, self.config.jvp_eps)
        return v - bcast(t - r, z) * dudt

    def mid_training_losses(self, x0: Tensor, cond, generator: torch.Generator) -> dict[str, Tensor]:
        """Consistency mid-training: chords of teacher Euler rollouts from noise (see the module docstring)."""
        c = self.config
        pairs = c.mid_training_pairs
        count = max(1, x0.shape[0] // pairs)
        cond = None if cond is None else cond[:count]
        times = flow_time(solver_sigmas("euler", c.mid_training_levels)).to(x0)  # T_MAX, ..., then 0
        z = times[0] * torch.randn((count, *x0.shape[1:]), generator=generator, device=x0.device).to(x0)
        states = [z]
        with torch.no_grad():
            for t_here, t_next in itertools.pairwise(times):
                level = t_here.expand(count)
                z = z - (t_here - t_next) * velocity(self.teacher, z, level, cond)
                states.append(z)
        states = torch.stack(states)  # (levels + 1, count, ...)
        n = len(times)
        i = torch.randint(0, n - 1, (count * pairs,), generator=generator, device=x0.device)
        j = i + 1 + (torch.rand(count * pairs, generator=generator, device=x0.device) * (n - 1 - i)).long()
        j = torch.clamp(j, max=n - 1)
        trajectory = torch.arange(count, device=x0.device).repeat(pairs)
        z_i, z_j, t_i, t_j = states[i, trajectory], states[j, trajectory], times[i], times[j]
        chord = (z_i - z_j) / bcast(t_i - t_j, z_i)
        cond = None if cond is None else cond[trajectory]
        prediction = average_velocity(self.student, z_i, t_j, t_i, cond)
        return {"loss": (prediction - chord).flatten(1).pow(2).mean(1).mean()}

    def after_update(self, phase: str, step: int) -> bool:
        """A new stage starts with fresh optimiser state."""
        return self.stage(step + 1) != self.stage(step)

    def sampling(self, nfe: int) -> Sampling:
        return flow_map_sampling(nfe)
