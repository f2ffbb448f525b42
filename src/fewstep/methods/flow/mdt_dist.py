"""MDT-dist: Marginal-Data Transport distillation. "Few-step Flow for 3D Generation via Marginal-Data Transport
Distillation", 2025 (code Zanue/MDT-dist, ``trainers/flow_matching/flow_matching_mdt.py``).

The student learns the transport from the marginal at any time to data, the teacher ODE's map to time 0. In the
paper's rectified-flow time (``x_t = (1 - t) x0 + t eps``, here ``t = s / (1 + s)`` of the VE level ``s`` and
``x_t = x / (1 + s)``) it is an average velocity to 0, read off the student denoiser ``f_theta`` (the map itself)::

    u_theta(x_t, t) = (x_t - f_theta(x, s)) / t            (so x0 = x_t - t u_theta)

The map is constant along the teacher's ODE, so ``u = v - t du/dt`` with ``v`` the teacher's velocity
``v = eps_hat - x0_hat`` (``x0_hat = D(x, s)``) and ``du/dt`` the total derivative along it (MeanFlow's identity
with ``r = 0``).

**Velocity matching** (VM), on real data ``x0``, ``t = t_min + (t_max - t_min) sigmoid(n)``, ``n ~ N(p_mean,
p_std^2)``::

    u_tgt = v - t du/dt,      du/dt = (u_theta(x_t, t) - u_theta(x_t - h v, t - h)) / h    (``derivative: discrete``)
                              or the JVP of u_theta along (v, 1)                         (``derivative: jvp``)
    L_VM  = mean_D || u_theta(x_t, t) - sg u_tgt ||^2

**Velocity distillation** (VD), on the student's own one-step samples ``x_g = f_theta(sigma_max z, sigma_max)``,
re-noised to ``x_t`` from ``sg x_g`` at a level drawn as above, with ``r = u_theta(x_t, t) - u_tgt(x_t, t)`` (no
gradient)::

    L_VD = mean_D || x_g - sg(x_g + r) ||^2

which has the paper's value ``|| v_pred - v_tgt + v_fake - sg v_fake ||^2`` and its gradient in the generator
(``x_g = z - v_fake`` at ``t = 1``): the one-step sample moves along the VM residual measured where it lands.
``L = vm_weight L_VM + vd_weight L_VD``; one teacher evaluation per sample for each term. Sampling: the map to 0,
then re-noising (:func:`~fewstep.solvers.sample_consistency`).

Deviations from the code: the tangent normalisation ``du/dt / (|du/dt| + c)`` is off by default
(``derivative_norm: null``; the code's 0.1 is ``derivative_norm: 0.1``), because it moves the target off the
exact map (the loss no longer vanishes there); no classifier-free guidance of its own (the code's teacher scales
40 and 100): a guided teacher is distilled with its own scale (``teacher.guidance``); no ``multiphase`` targets
(few-step sampling re-noises instead); the one-step generator starts at ``sigma_max`` (RF ``t = 80/81``, not 1);
optimiser settings are the run's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.jvp import jvp
from fewstep.methods.base import DistillationMethod, MethodConfig
from fewstep.methods.losses import check_choice, squared_l2
from fewstep.models.denoiser import Denoiser
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, SIGMA_MIN, Sampling, solver_sigmas

DERIVATIVES = ("discrete", "jvp")


@dataclass
class MDTDistConfig(MethodConfig):
    p_mean: float = 1.0  # logit-normal times (rectified-flow t) of both terms
    p_std: float = 1.0
    derivative: str = "discrete"
    h: float = 0.01  # the discrete derivative's step in rectified-flow time
    derivative_norm: float | None = None  # the code's d_norm constant (0.1), or None for no normalisation
    vm_weight: float = 1.0
    vd_weight: float = 1.0
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX


class MDTDist(DistillationMethod):
    name = "mdt_dist"
    family = "flow"
    paper = "MDT-dist 2025, Few-step Flow for 3D Generation via Marginal-Data Transport Distillation"
    needs = frozenset({"data"})
    Config = MDTDistConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: MDTDistConfig):
        super().__init__(teacher, student, config)
        check_choice("derivative", config.derivative, DERIVATIVES)
        if not 0 < config.h < 0.5:
            raise ConfigError(f"method_args.h must be in (0, 0.5), got {config.h}")
        if config.derivative_norm is not None and config.derivative_norm <= 0:
            raise ConfigError(f"method_args.derivative_norm must be > 0 or null, got {config.derivative_norm}")
        if config.vm_weight < 0 or config.vd_weight < 0 or config.vm_weight + config.vd_weight == 0:
            raise ConfigError("method_args: vm_weight and vd_weight must be >= 0, not both 0")
        if config.p_std <= 0:
            raise ConfigError(f"method_args.p_std must be > 0, got {config.p_std}")
        if not 0 < config.sigma_min < config.sigma_max:
            raise ConfigError("method_args: need 0 < sigma_min < sigma_max")

    def average_velocity(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """``u_theta(x_t, t) = (x_t - f_theta(x_t / (1 - t), t / (1 - t))) / t`` (rectified-flow state and time)."""
        return (x_t - self.student(x_t / bcast(1 - t, x_t), t / (1 - t), cond)) / bcast(t, x_t)

    def teacher_velocity(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """The teacher's rectified-flow velocity ``eps_hat - x0_hat`` at ``(x_t, t)``."""
        x, s = x_t / bcast(1 - t, x_t), t / (1 - t)
        x0 = self.teacher(x, s, cond)
        return (x - x0) / bcast(s, x) - x0

    def time_derivative(self, x_t: Tensor, t: Tensor, v: Tensor, cond) -> Tensor:
        """``du_theta/dt`` along ``dx_t/dt = v`` (no gradient), normalised when ``derivative_norm`` is set."""
        if self.config.derivative == "jvp":
            _, derivative = jvp(lambda y, time: self.average_velocity(y, time, cond), (x_t, t), (v, torch.ones_like(t)))
        else:
            h = self.config.h
            before = self.average_velocity(x_t - h * v, t - h, cond)
            derivative = (self.average_velocity(x_t, t, cond) - before) / h
        if self.config.derivative_norm is not None:
            norm = derivative.flatten(1).norm(dim=1)
            derivative = derivative / bcast(norm + self.config.derivative_norm, derivative)
        return derivative

    @torch.no_grad()
    def velocity_target(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """``u_tgt = v - t du/dt``."""
        v = self.teacher_velocity(x_t, t, cond)
        return v - bcast(t, x_t) * self.time_derivative(x_t, t, v, cond)

    def draw_times(self, batch: int, generator: torch.Generator, like: Tensor) -> Tensor:
        """Logit-normal rectified-flow times in ``[t_min, t_max]``: ``t_max`` is ``sigma_max``'s, ``t_min`` leaves
        room for the discrete derivative's step below ``sigma_min``'s."""
        c = self.config
        t_max, t_min = c.sigma_max / (1 + c.sigma_max), c.sigma_min / (1 + c.sigma_min) + c.h
        n = c.p_mean + c.p_std * torch.randn(batch, generator=generator, device=like.device, dtype=like.dtype)
        return t_min + (t_max - t_min) * torch.sigmoid(n)

    def noised(self, x0: Tensor, t: Tensor, generator: torch.Generator) -> Tensor:
        """``x_t = (1 - t) x0 + t eps``."""
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return bcast(1 - t, x0) * x0 + bcast(t, x0) * eps

    def vm_loss(self, x0: Tensor, cond, generator: torch.Generator) -> Tensor:
        t = self.draw_times(x0.shape[0], generator, x0)
        x_t = self.noised(x0, t, generator)
        target = self.velocity_target(x_t, t, cond)
        return squared_l2(self.average_velocity(x_t, t, cond), target).mean()

    def vd_loss(self, like: Tensor, cond, generator: torch.Generator) -> Tensor:
        z = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        levels = torch.full((z.shape[0],), self.config.sigma_max, device=z.device, dtype=z.dtype)
        x_generated = self.student(self.config.sigma_max * z, levels, cond)
        t = self.draw_times(z.shape[0], generator, z)
        x_t = self.noised(x_generated.detach(), t, generator)
        with torch.no_grad():
            residual = self.average_velocity(x_t, t, cond) - self.velocity_target(x_t, t, cond)
        return squared_l2(x_generated, (x_generated + residual).detach()).mean()

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        c, losses = self.config, {}
        if c.vm_weight > 0:
            losses["vm"] = self.vm_loss(batch.x0, batch.cond, generator)
        if c.vd_weight > 0:
            losses["vd"] = self.vd_loss(batch.x0, batch.cond, generator)
        loss = c.vm_weight * losses.get("vm", 0.0) + c.vd_weight * losses.get("vd", 0.0)
        return {"loss": loss, **{name: value.detach() for name, value in losses.items()}}

    def sampling(self, nfe: int) -> Sampling:
        c = self.config
        return Sampling("consistency", solver_sigmas("euler", nfe, c.sigma_min, c.sigma_max).tolist()[:-1])
