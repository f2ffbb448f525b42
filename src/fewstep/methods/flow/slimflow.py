"""SlimFlow: a smaller one-step student by annealing reflow and flow-guided distillation. Zhu, Liu, Liu & Liu,
"SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow", ECCV 2024.

The student is a fresh network smaller than the teacher (``student_backbone_args``: fewer or narrower layers; a
student with as many parameters as a network teacher is refused), so it cannot start from the teacher's weights.
Two stages (:mod:`fewstep.methods.flow.rectify`):

**Annealing reflow** (``rounds`` rounds, the first on the teacher's pairs ``(z, x)``): reflow whose noise moves
from independent to coupled, ``z' = sqrt(1 - beta^2) z + beta eps`` with fresh ``eps`` and ``beta`` falling
linearly from 1 to 0 over the first ``anneal_steps`` updates of round one::

    L_reflow = E_t || (x - D_theta(x + s z', s)) / t ||^2,   t uniform,   s = t / (1 - t)

**Flow-guided distillation** of the small 2-rectified flow ``D_2`` (the student at the end of reflow, frozen)
into its own one-step map ``x_hat = T_theta(z) = D_theta(sigma_max z, sigma_max)``, on pairs ``(z, x')`` that
``D_2`` makes (``pair_solver`` at ``round_nfe`` evaluations), plus its guidance: a point on the student's own
straight line at ``t' ~ U[guide_t_min, guide_t_max]`` and the 2-rectified flow's one Euler step to data from there::

    x_guide = D_2(sg x_hat + s' z, s'),   s' = t' / (1 - t')
    L_distill = ( || x_hat - x' ||^2 + guide_weight || x_hat - sg x_guide ||^2 ) / t_max^2

(velocity errors of the one-step jump: ``x_hat - z`` against ``x' - z`` and ``x_guide - z``).

Deviations from the paper: L2 instead of LPIPS (``premetric = "pseudo_huber"`` is offered); linear rather than
exponential/cosine annealing; no horizontal-flip augmentation of data and noise; time stops at ``t = 80/81``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.flow.rectify import (
    T_MAX,
    DistillingFlowConfig,
    RectifiedFlowMethod,
    straight_point,
    ve_level,
)
from fewstep.models.denoiser import Denoiser, EDMDenoiser, innermost
from fewstep.solvers import SIGMA_MAX


@dataclass
class SlimFlowConfig(DistillingFlowConfig):
    anneal_steps: int = 500
    guide_weight: float = 1.0
    guide_t_min: float = 0.2
    guide_t_max: float = 0.8


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SlimFlow(RectifiedFlowMethod):
    """Annealing reflow of a small fresh student, then flow-guided distillation into its one-step map."""

    name = "slimflow"
    paper = "Zhu et al. 2024, SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow"
    Config = SlimFlowConfig
    distills = True

    def __init__(self, teacher: Denoiser, student: Denoiser, config: SlimFlowConfig):
        super().__init__(teacher, student, config)
        if config.anneal_steps < 0 or config.guide_weight < 0:
            raise ConfigError("method_args: need anneal_steps >= 0 and guide_weight >= 0")
        if not 0 < config.guide_t_min <= config.guide_t_max < 1:
            raise ConfigError(f"method_args: need 0 < guide_t_min <= guide_t_max < 1, got {config.guide_t_min}, "
                              f"{config.guide_t_max}")

    @classmethod
    def run_schedule(cls, steps: int, args: dict) -> dict:
        """Stages split evenly; the noise anneals over the first half of round one."""
        schedule = super().run_schedule(steps, args)
        return {**schedule, "anneal_steps": schedule["steps_per_round"] // 2}

    @classmethod
    def build_student(cls, teacher: Denoiser, config: SlimFlowConfig, new_backbone: Callable[[], nn.Module],
                      sigma_data: float) -> Denoiser:
        """A fresh EDM-preconditioned ``new_backbone()``, refused unless smaller than a network teacher."""
        student = EDMDenoiser(new_backbone(), sigma_data)
        teacher_network = getattr(innermost(teacher), "backbone", None)
        if teacher_network is not None and parameter_count(student) >= parameter_count(teacher_network):
            raise ConfigError(f"SlimFlow's student must be smaller than its teacher ({parameter_count(student):,} >= "
                              f"{parameter_count(teacher_network):,} parameters): give student_backbone_args a "
                              "smaller width or depth")
        return student

    def coupled_noise(self, noise: Tensor, generator: torch.Generator) -> Tensor:
        """``sqrt(1 - beta^2) z + beta eps``, ``beta`` linear from 1 to 0 over round one's first ``anneal_steps``."""
        if int(self.stage) > 0 or int(self.updates_in_stage) >= self.config.anneal_steps:
            return noise
        beta = 1.0 - int(self.updates_in_stage) / self.config.anneal_steps
        eps = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        return math.sqrt(1 - beta**2) * noise + beta * eps

    def distill_losses(self, pairs: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        noise, endpoint = pairs.noise, pairs.endpoint
        top = torch.full((noise.shape[0],), SIGMA_MAX, device=noise.device, dtype=noise.dtype)
        jump = self.student(SIGMA_MAX * noise, top, pairs.cond)
        t_max = torch.full_like(top, T_MAX)
        distill = self.premetric(jump, endpoint, t_max)
        values = {"distill": distill.mean()}
        loss = distill
        if self.config.guide_weight > 0:
            low, high = self.config.guide_t_min, self.config.guide_t_max
            t = low + (high - low) * torch.rand(noise.shape[0], generator=generator, device=noise.device,
                                                dtype=noise.dtype)
            s = ve_level(t)
            with torch.no_grad():
                guide = self.previous(straight_point(jump.detach(), noise, s), s, pairs.cond)
            guided = self.premetric(jump, guide, t_max)
            values["guide"] = guided.mean()
            loss = loss + self.config.guide_weight * guided
        return {"loss": loss.mean(), **values}


