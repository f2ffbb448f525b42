"""Continuous-time consistency models on TrigFlow: sCT (training) and sCD (distillation).
Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", 2024.

TrigFlow: ``x_t = cos(t) x0 + sin(t) z`` with ``z = sigma_d eps``, ``t in [0, pi/2]``; the VE coordinate is
``x = x_t / cos(t)`` at ``s = sigma_d tan(t)``. The student is the consistency function

    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t),

which is exactly an EDM-preconditioned denoiser read in the VE coordinate (``c_skip = cos^2 t``,
``c_out = sigma_d sin t``, ``c_in = cos t / sigma_d``) with ``F = -F_edm`` and time input
``c_noise = log(sigma_d tan t) / 4``. So the student is an :class:`~fewstep.models.denoiser.EDMDenoiser`,
initialised from the teacher's network when there is one, and samples with the ``consistency`` sampler in VE
levels (re-noising ``x_t = cos t x0 + sin t z`` is ``x = x0 + s z`` in VE).

One step draws ``t = arctan(e^tau / sigma_d)``, ``tau ~ N(P_mean, P_std^2)``, and ``x_t`` from data, then

    dx_t/dt = -sin(t) x0 + cos(t) z                            (sCT: the conditional velocity, no teacher)
    dx_t/dt = teacher PF-ODE velocity on TrigFlow at (x_t, t)   (sCD, :func:`trigflow_velocity`)
    cs dF-/dt = JVP of F_theta- at (x_t, t) along (cs dx_t/dt, cs),   cs = cos(t) sin(t)   (stop-gradient)
    g  = -cos^2(t) (sigma_d F- - dx_t/dt) - r (cs x_t + sigma_d cs dF-/dt)    (= cos(t) df-/dt at r = 1)
    g <- g / (||g|| + c)                                                      (tangent normalisation)
    L  = e^{-u(t)} mean_D ||F_theta - sg(F_theta) - g||^2 + u(t)

with ``theta- = sg(theta)``, ``r = min(1, step / tangent_warmup)`` and ``u`` a small learned log-variance head
(a method parameter trained with the student). The gradient of ``L`` in ``theta`` is
``-2 e^{-u} g . dF/dtheta / D``, the continuous limit of discrete CD's gradient with step ``dt -> 0``.

Deviations from the paper: the network's time input stays EDM's ``log(s)/4`` (not ``c_noise = t``) so the
student starts as an exact copy of an EDM teacher; the ``cos t sin t`` factor of the tangent cancels its growth
near both ends, so the tangent's time term is ``sigma_d / 4 dF/dc_noise``, bounded by how fast the time features
change. The paper's other fix, no large Fourier scales, is a backbone option: the ring recipes' students (sCT,
sCD, rCM) have time features at most 20 radians per unit of ``c_noise`` (``time_frequencies: [0.1, 20]``; the
default reaches 100). The normalisation constant ``c`` (the paper's 0.1) matters relative to ``||g||``: image-sized
tangents are normalised fully by it, but a 2-D tangent is small, so it damps every update; the ``ring8-scd``
recipe uses ``c = 0.01``. What both choices do on the ring and on digits is in ``docs/consistency.md``.
No prior weighting ``1/(sigma_d tan t)`` (FastGen's option) and no adaptive double normalisation or QK-norm
(our backbones are small MLPs / UNets). Multistep levels are a fixed rule: the second level at TrigFlow time
``sampling_t_mid`` (the paper's 1.1) and further ones evenly spaced below it; :func:`fewstep.tune_levels`
(``eval.tune_levels`` in a recipe) replaces them by levels chosen on the training split, which the
``digits-scd`` recipe does.
sCD's target is the exact map, where discrete CD's is the teacher's Heun map on its grid (``docs/consistency.md``
compares the two on the exact ring). The JVP is forward mode with a finite-difference fallback (``jvp = "auto"``,
:mod:`fewstep.jvp`); the recipes use ``"finite_difference"``, which is cheaper on a CPU for small MLPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.jvp import JVP_METHODS, jvp
from fewstep.methods.base import DistillationMethod, MethodConfig, Phase
from fewstep.models.denoiser import Denoiser, EDMDenoiser, velocity_on_path
from fewstep.nets.embeddings import TimeEmbedding
from fewstep.paths import TrigFlow, bcast
from fewstep.solvers import SIGMA_MAX, Sampling

T_MIN, T_MAX = 1e-4, 0.5 * math.pi - 1e-4


@dataclass
class SCMConfig(MethodConfig):
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_warmup: int = 1000
    tangent_norm_c: float = 0.1
    sigma_max: float = SIGMA_MAX
    sampling_t_mid: float = 1.1
    jvp: str = "auto"


def trigflow_velocity(denoiser: Denoiser, x_t: Tensor, t: Tensor, sigma_data: float, cond=None) -> Tensor:
    """The probability-flow ODE velocity ``dx_t/dt`` on TrigFlow of any denoiser (SANA-Sprint's training-free
    transform): read at ``x = x_t / cos t``, ``s = sigma_d tan t``, then ``-sin t x0 + cos t z``."""
    return velocity_on_path(denoiser, x_t, t, TrigFlow(sigma_data), cond)


def trigflow_output(student: EDMDenoiser, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
    """``F(x_t / sigma_d, t) = -F_edm(c_in x, log(s) / 4)`` of an EDM-preconditioned student."""
    sd = student.sigma_data
    c_noise = 0.25 * torch.log(sd * torch.tan(t))
    return -student.backbone(x_t / sd, c_noise, cond).to(x_t.dtype)


def trigflow_consistency(student: EDMDenoiser, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
    """``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)``."""
    sd = student.sigma_data
    return bcast(torch.cos(t), x_t) * x_t - bcast(torch.sin(t), x_t) * sd * trigflow_output(student, x_t, t, cond)


class LogVarianceHead(nn.Module):
    """``u(t)``: the adaptive weight's log-variance, a small MLP on the time embedding; starts at 0."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.embedding = TimeEmbedding(dim)
        self.out = nn.Linear(dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, t: Tensor) -> Tensor:
        return self.out(nn.functional.silu(self.embedding(t))).squeeze(1)


class ContinuousConsistency(DistillationMethod):
    """Shared loss of sCT and sCD; subclasses give :meth:`velocity`."""

    family = "consistency"
    paper = "Lu & Song 2024, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models"
    Config = SCMConfig
    warmup_share = 0.1  # a run fitted to its length (run_schedule) warms its tangent up over its first tenth

    def __init__(self, teacher: Denoiser, student: Denoiser, config: SCMConfig):
        super().__init__(teacher, student, config)
        if type(student) is not EDMDenoiser:
            raise ConfigError(f"{self.name} needs an EDMDenoiser student (its TrigFlow form), got "
                              f"{type(student).__name__}")
        if config.jvp not in JVP_METHODS:
            raise ConfigError(f"{self.name}: jvp must be one of {JVP_METHODS}, got {config.jvp!r}")
        if not 0 < config.sampling_t_mid < 0.5 * math.pi or config.tangent_norm_c <= 0 or config.p_std <= 0:
            raise ConfigError(f"{self.name}: need 0 < sampling_t_mid < pi/2, tangent_norm_c > 0 and p_std > 0")
        self.sigma_data = student.sigma_data
        self.logvar = LogVarianceHead()

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """The tangent warms up over the run's first :attr:`warmup_share`."""
        return {"tangent_warmup": max(1, int(steps * cls.warmup_share))}

    def phases(self) -> list[Phase]:
        return [Phase("student", list(self.student.parameters()) + list(self.logvar.parameters()))]

    def velocity(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, cond) -> Tensor:
        raise NotImplementedError

    def sample_time(self, batch: int, generator: torch.Generator, like: Tensor) -> Tensor:
        """``t = arctan(e^tau / sigma_d)``, ``tau ~ N(P_mean, P_std^2)``, clamped inside ``(0, pi/2)``."""
        tau = self.config.p_mean + self.config.p_std * torch.randn(batch, generator=generator,
                                                                   device=like.device).to(like.dtype)
        return torch.atan(torch.exp(tau) / self.sigma_data).clamp(T_MIN, T_MAX)

    def tangent(self, x_t: Tensor, t: Tensor, dxdt: Tensor, cond, ramp: float) -> tuple[Tensor, Tensor]:
        """``(F-, g)`` before normalisation, with ``F-`` and the JVP from the current weights, no gradient."""
        sd, cs = self.sigma_data, torch.cos(t) * torch.sin(t)
        with torch.no_grad():
            f_minus, cs_dfdt = jvp(lambda x, time: trigflow_output(self.student, x, time, cond), (x_t, t),
                                   (bcast(cs, dxdt) * dxdt, cs), method=self.config.jvp)
            g = (-bcast(torch.cos(t) ** 2, x_t) * (sd * f_minus - dxdt)
                 - ramp * (bcast(cs, x_t) * x_t + sd * cs_dfdt))
        return f_minus, g

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        x0, cond = batch.x0, batch.cond
        t = self.sample_time(x0.shape[0], generator, x0)
        z = self.sigma_data * torch.randn(x0.shape, generator=generator, device=x0.device).to(x0.dtype)
        x_t = bcast(torch.cos(t), x0) * x0 + bcast(torch.sin(t), x0) * z
        dxdt = self.velocity(x0, z, x_t, t, cond)
        ramp = min(1.0, step / self.config.tangent_warmup) if self.config.tangent_warmup > 0 else 1.0
        f_minus, g = self.tangent(x_t, t, dxdt, cond, ramp)
        g_norm = g.flatten(1).norm(dim=1)
        g = g / bcast(g_norm + self.config.tangent_norm_c, g)
        prediction = trigflow_output(self.student, x_t, t, cond)
        logvar = self.logvar(0.25 * torch.log(self.sigma_data * torch.tan(t)))
        per_sample = torch.exp(-logvar) * (prediction - f_minus - g).flatten(1).pow(2).mean(1) + logvar
        return {"loss": per_sample.mean(), "g_norm": g_norm.mean(), "logvar": logvar.mean().detach()}

    def sampling(self, nfe: int) -> Sampling:
        """One step from ``sigma_max``; further levels at TrigFlow times evenly spaced from ``sampling_t_mid``
        down (``nfe = 4``: 1.1, 0.73, 0.37), as VE levels ``sigma_d tan t`` for the consistency sampler."""
        if nfe < 1:
            raise ConfigError(f"nfe must be >= 1, got {nfe}")
        t_mid = self.config.sampling_t_mid
        times = [t_mid * (nfe - 1 - k) / (nfe - 1) for k in range(nfe - 1)]
        return Sampling("consistency", [self.config.sigma_max] + [self.sigma_data * math.tan(t) for t in times])


class SCT(ContinuousConsistency):
    """sCT: continuous-time consistency training from data alone (it never calls the teacher)."""

    name = "sct"

    def velocity(self, x0, z, x_t, t, cond):
        return -bcast(torch.sin(t), x0) * x0 + bcast(torch.cos(t), z) * z


class SCD(ContinuousConsistency):
    """sCD: continuous-time consistency distillation along the teacher's TrigFlow PF-ODE."""

    name = "scd"

    def velocity(self, x0, z, x_t, t, cond):
        with torch.no_grad():
            return trigflow_velocity(self.teacher, x_t, t, self.sigma_data, cond)
