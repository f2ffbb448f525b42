"""Flow-map distillation in Eulerian and Lagrangian form. Sabour, Fidler & Kreis, "Align Your Flow: Scaling
Continuous-Time Flow Map Distillation", 2025 (AYF-EMD and AYF-LMD; the Lagrangian form is Boffi et al.'s
Lagrangian map distillation).

The student is a flow map ``X(z, t, s) = z - (t - s) u(z, s, t)`` on the rectified-flow path
(:mod:`fewstep.methods.flow.maps`), ``s <= t``. The exact map of the teacher's ODE ``dz/dt = v(z, t)`` satisfies

    Eulerian:    dX(z_t, t, s)/dt = 0 along the ODE         <=>  u = v(z_t, t) - (t - s) du/dt
    Lagrangian:  dX(z_t, t, s)/ds = v(X(z_t, t, s), s)      <=>  u = v(X, s) + (t - s) du/ds

Each step draws ``t >= s`` (a logit-normal ``(p_mean, p_std)`` and a ``(target_p_mean, target_p_std)`` draw,
sorted; ``s = t`` except for a share ``s_neq_t_share``) and
``z_t = (1 - t) x0 + t eps`` from data, and takes the residual ``g`` of the chosen condition at the student's
current weights (no gradient; ``du/dt`` is a JVP along ``(v, 1)``, ``du/ds`` one along the target time)::

    g = v(z_t, t) - u- - r (t - s) du-/dt               (form = "eulerian")
    g = v(X-, s) - u- + r (t - s) du-/ds                (form = "lagrangian"; X- = X(z_t, t, s), the student's jump)
    g <- g / (||g|| + c)                                (tangent normalisation)
    L = mean ||u_theta(z_t, s, t) - sg(u_theta + g)||^2

``r = min(1, step / tangent_warmup)`` warms the derivative term up (sCM's tangent warm-up); the gradient of
``L`` is ``-2 g . du/dtheta``. At ``s = t`` both forms are flow matching to the teacher's velocity. One teacher
call per sample and step.

Deviations from the paper: no autoguidance and no adversarial fine-tuning; the student is the teacher's network
(EDM-preconditioned, copied) with the target time as a zero-initialised extra input, read as flow time (which
is what makes ``du/ds`` exist at ``s = 0``); ``(t, s)`` are drawn as MeanFlow's ``(t, r)`` (FastGen's separate
distribution for the earlier time); the teacher's
velocity in the Lagrangian target is read at ``max(s, T_MIN)``. Sampling jumps the flow map down Karras levels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.jvp import JVP_METHODS
from fewstep.methods.base import DistillationMethod, MethodConfig
from fewstep.methods.flow.maps import (
    average_velocity,
    build_flow_map_student,
    check_flow_map_student,
    draw_times,
    eulerian_residual,
    flow_map_sampling,
    lagrangian_residual,
    noised,
    normalised,
    regression_to,
)
from fewstep.methods.losses import check_choice, check_rate
from fewstep.models.denoiser import Denoiser, TwoTimeDenoiser
from fewstep.solvers import Sampling

FORMS = ("eulerian", "lagrangian")


@dataclass
class FlowMapConfig(MethodConfig):
    form: str = "eulerian"
    s_neq_t_share: float = 0.75
    p_mean: float = -0.4
    p_std: float = 1.0
    target_p_mean: float = -0.4
    target_p_std: float = 1.0
    tangent_norm_c: float = 0.1
    tangent_warmup: int = 1000
    jvp: str = "auto"
    jvp_eps: float = 1e-3


class FlowMapDistillation(DistillationMethod):
    name = "flow_map"
    family = "flow"
    paper = "Sabour, Fidler & Kreis 2025, Align Your Flow (Eulerian / Lagrangian map distillation)"
    Config = FlowMapConfig
    warmup_share = 0.1  # a run fitted to its length warms the derivative term up over its first tenth

    def __init__(self, teacher: Denoiser, student: TwoTimeDenoiser, config: FlowMapConfig):
        super().__init__(teacher, student, config)
        check_flow_map_student(self.name, student)
        check_choice("form", config.form, FORMS)
        check_choice("jvp", config.jvp, JVP_METHODS)
        check_rate("s_neq_t_share", config.s_neq_t_share)
        if (min(config.p_std, config.target_p_std, config.tangent_norm_c, config.jvp_eps) <= 0
                or config.tangent_warmup < 0):
            raise ConfigError("method_args: need p_std, target_p_std, tangent_norm_c and jvp_eps > 0 and "
                              "tangent_warmup >= 0")

    @classmethod
    def build_student(cls, teacher: Denoiser, config: MethodConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> TwoTimeDenoiser:
        return build_flow_map_student(teacher, new_backbone, sigma_data)

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        return {"tangent_warmup": max(1, int(steps * cls.warmup_share))}

    def ramp(self, step: int) -> float:
        warmup = self.config.tangent_warmup
        return min(1.0, step / warmup) if warmup > 0 else 1.0

    def residual(self, z: Tensor, s: Tensor, t: Tensor, cond, step: int) -> Tensor:
        """The chosen form's residual ``g`` before normalisation (no gradient)."""
        c = self.config
        form = eulerian_residual if c.form == "eulerian" else lagrangian_residual
        return form(self.student, self.teacher, z, s, t, cond, self.ramp(step), c.jvp, c.jvp_eps)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        c, x0 = self.config, batch.x0
        t, s = draw_times(x0.shape[0], generator, x0, c.p_mean, c.p_std, c.target_p_mean,
                              c.target_p_std, c.s_neq_t_share)
        z = noised(x0, torch.randn(x0.shape, generator=generator, device=x0.device).to(x0), t)
        g = self.residual(z, s, t, batch.cond, step)
        loss = regression_to(average_velocity(self.student, z, s, t, batch.cond), normalised(g, c.tangent_norm_c))
        return {"loss": loss, "g_norm": g.flatten(1).norm(dim=1).mean()}

    def sampling(self, nfe: int) -> Sampling:
        return flow_map_sampling(nfe)
