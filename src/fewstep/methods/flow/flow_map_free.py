"""Flow-map distillation without data (FreeFlow). Tong, Ma, Xie & Jaakkola, "Flow Map Distillation Without Data",
2025.

Only prior samples: the student never sees a data point or a noised one. It is a flow map
``X(z, t, s) = z - (t - s) u(z, s, t)`` on the rectified-flow path (:mod:`fewstep.methods.flow.maps`) that
predicts the teacher's sampling path from noise ``z_1 = T_MAX eps``, with two terms:

* **prediction** (Lagrangian, along the student's own path): a start point ``z_t`` is the noise itself (a share
  ``start_share`` of the batch, ``t = T_MAX``) or the student's own jump ``sg X(z_1, T_MAX, t)``; with
  ``s <= t`` drawn as in :mod:`~fewstep.methods.flow.flow_map`::

      g      = v(X-(z_t, t, s), s) - u- + r (t - s) du-/ds,    g <- g / (||g|| + c)
      L_pred = mean ||u_theta(z_t, s, t) - sg(u_theta + g)||^2

  so ``dX/ds`` follows the teacher's velocity where the student itself goes;
* **correction** of the compounding error of a self-generated path, at the distribution level: the one-jump
  sample ``x_G = X_theta(z_1, T_MAX, 0)`` is noised to a level ``sigma`` and moved along DMD's normalised
  direction from a fake denoiser ``D_fake`` trained on ``sg x_G`` to the teacher's (:mod:`fewstep.methods.scores`)::

      L_corr = 1/2 mean_D || x_G - sg(x_G - (D_fake - D_real) / mean_D |x_G - D_real|) ||^2
      L      = L_pred + correction_weight L_corr

The fake denoiser is a copy of the student read on its diagonal (``g(x, sigma, sigma)``), trained by EDM-weighted
denoising on the student's one-jump samples (phase ``fake_score``, ``fake_updates`` per cycle). Two teacher calls
per sample and student step, none in the fake phase.

Deviations from the paper (whose training code is not public; this follows its abstract and description): the
prediction term starts from the student's own intermediate points as well as from noise, so multi-step sampling
sees trained jumps; the correction is DMD's normalised score difference (variational score distillation with a
fake denoiser), with the generated samples noised on the VE path at DMD2's grid levels; no guidance. The student
is the teacher's network with a zero-initialised flow-time target input, as in ``flow_map``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.jvp import JVP_METHODS
from fewstep.methods.base import DistillationMethod, MethodConfig, Phase
from fewstep.methods.flow.maps import (
    T_MAX,
    DiagonalDenoiser,
    average_velocity,
    build_flow_map_student,
    check_flow_map_student,
    draw_times,
    flow_map,
    flow_map_sampling,
    lagrangian_residual,
    normalised,
    regression_to,
)
from fewstep.methods.losses import check_choice, check_rate
from fewstep.methods.scores import dmd_direction, fake_score_loss, karras_index_sigma, pseudo_target_loss
from fewstep.methods.scores import noised as ve_noised
from fewstep.models.denoiser import Denoiser, TwoTimeDenoiser
from fewstep.solvers import Sampling


@dataclass
class FreeFlowConfig(MethodConfig):
    start_share: float = 0.5
    s_neq_t_share: float = 0.75
    p_mean: float = -0.4
    p_std: float = 1.0
    target_p_mean: float = -0.4
    target_p_std: float = 1.0
    tangent_norm_c: float = 0.1
    tangent_warmup: int = 1000
    jvp: str = "auto"
    jvp_eps: float = 1e-3
    correction_weight: float = 1.0
    fake_updates: int = 1
    fake_lr_scale: float = 1.0


class FlowMapWithoutData(DistillationMethod):
    name = "flow_map_free"
    family = "flow"
    paper = "Tong, Ma, Xie & Jaakkola 2025, Flow Map Distillation Without Data (FreeFlow)"
    needs = frozenset({"noise"})
    Config = FreeFlowConfig
    warmup_share = 0.1

    def __init__(self, teacher: Denoiser, student: TwoTimeDenoiser, config: FreeFlowConfig):
        super().__init__(teacher, student, config)
        check_flow_map_student(self.name, student)
        check_choice("jvp", config.jvp, JVP_METHODS)
        check_rate("start_share", config.start_share)
        check_rate("s_neq_t_share", config.s_neq_t_share)
        if (min(config.p_std, config.target_p_std, config.tangent_norm_c, config.jvp_eps) <= 0
                or config.tangent_warmup < 0):
            raise ConfigError("method_args: need p_std, target_p_std, tangent_norm_c and jvp_eps > 0 and "
                              "tangent_warmup >= 0")
        if config.correction_weight < 0 or config.fake_updates < 1 or config.fake_lr_scale <= 0:
            raise ConfigError("method_args: need correction_weight >= 0, fake_updates >= 1 and fake_lr_scale > 0")
        self.sigma_data = student.sigma_data
        self.fake_score = DiagonalDenoiser(copy.deepcopy(student))

    @classmethod
    def build_student(cls, teacher: Denoiser, config: MethodConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> TwoTimeDenoiser:
        return build_flow_map_student(teacher, new_backbone, sigma_data)

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        return {"tangent_warmup": max(1, int(steps * cls.warmup_share))}

    def phases(self) -> list[Phase]:
        return [Phase("fake_score", list(self.fake_score.parameters()), self.config.fake_updates,
                      self.config.fake_lr_scale), Phase("student", list(self.student.parameters()))]

    def ramp(self, step: int) -> float:
        warmup = self.config.tangent_warmup
        return min(1.0, step / warmup) if warmup > 0 else 1.0

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        noise, cond = batch.noise, batch.cond
        top = torch.full((noise.shape[0],), T_MAX, device=noise.device, dtype=noise.dtype)
        z_top = T_MAX * noise
        if phase == "fake_score":
            if self.config.correction_weight == 0:
                return {"loss": torch.zeros((), device=noise.device)}  # idle: no correction, nothing to track
            with torch.no_grad():
                x_generated = flow_map(self.student, z_top, top, torch.zeros_like(top), cond)
            sigma = karras_index_sigma(noise.shape[0], generator, noise)
            return {"loss": fake_score_loss(self.fake_score, x_generated, sigma, cond, generator, self.sigma_data)}
        prediction = self.prediction_loss(z_top, top, cond, step, generator)
        if self.config.correction_weight == 0:
            return {"loss": prediction}
        correction = self.correction_loss(z_top, top, cond, generator)
        return {"loss": prediction + self.config.correction_weight * correction,
                "prediction": prediction.detach(), "correction": correction.detach()}

    def start_points(self, z_top: Tensor, top: Tensor, cond,
                     generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(z_t, t, s)``: noise at ``T_MAX`` for a ``start_share`` of the batch, else the student's own jump to a
        drawn ``t`` (no gradient); ``s <= t``."""
        c = self.config
        t, s = draw_times(z_top.shape[0], generator, z_top, c.p_mean, c.p_std, c.target_p_mean,
                              c.target_p_std, c.s_neq_t_share)
        from_noise = torch.rand(t.shape, generator=generator, device=t.device) < c.start_share
        t = torch.where(from_noise, top, t)
        s = torch.where(from_noise, torch.minimum(s, t), s)
        with torch.no_grad():
            z_t = flow_map(self.student, z_top, top, t, cond)
        return z_t, t, s

    def prediction_loss(self, z_top: Tensor, top: Tensor, cond, step: int, generator: torch.Generator) -> Tensor:
        c = self.config
        z_t, t, s = self.start_points(z_top, top, cond, generator)
        g = lagrangian_residual(self.student, self.teacher, z_t, s, t, cond, self.ramp(step), c.jvp, c.jvp_eps)
        return regression_to(average_velocity(self.student, z_t, s, t, cond), normalised(g, c.tangent_norm_c))

    def correction_loss(self, z_top: Tensor, top: Tensor, cond, generator: torch.Generator) -> Tensor:
        """DMD's pseudo-target loss on the one-jump sample against the fake denoiser (see the module docstring)."""
        x_generated = flow_map(self.student, z_top, top, torch.zeros_like(top), cond)
        sigma = karras_index_sigma(x_generated.shape[0], generator, x_generated, 0.02, 0.98)
        with torch.no_grad():
            x = ve_noised(x_generated, sigma, generator)
            direction = dmd_direction(x_generated, self.teacher(x, sigma, cond), self.fake_score(x, sigma, cond))
        return pseudo_target_loss(x_generated, direction)

    def sampling(self, nfe: int) -> Sampling:
        return flow_map_sampling(nfe)
