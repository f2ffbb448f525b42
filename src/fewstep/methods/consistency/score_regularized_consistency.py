"""rCM: score-regularised continuous-time consistency, sCD plus a distribution-matching (DMD) term.
After "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency" (NVIDIA 2025,
code NVlabs/rcm).

sCD (:mod:`continuous_consistency`) covers the teacher's modes but, at scale, blurs detail; a reverse-KL
score-distillation term on the student's own samples sharpens them. Two phases per cycle:

**Fake score** (``fake_updates`` updates): a denoiser ``D_phi`` (initialised from the teacher's network, or
from the student's for an analytic teacher) learns the student's current output distribution::

    x_G = sg G_theta(z)                     (G: the student sampling with k ~ U{1..max_generation_steps} steps)
    x   = x_G + sigma eps,   sigma = sigma_d s / (1 - s),   s = a u / (1 + (a - 1) u),   u ~ U(0.02, 0.98)
    L_fake = lambda(sigma) mean_D || D_phi(x, sigma) - x_G ||^2,   lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2

(``a = dmd_shift``, 5 in the paper: levels skewed to high noise.)

**Student** (one update): the sCD loss plus ``dmd_weight`` times the DMD loss on a fresh student sample
``x_G = G_theta(z)`` (gradient through the last sampling step only)::

    x      = sg(x_G) + sigma eps
    grad   = (D_phi(x, sigma) - D_teacher(x, sigma)) / mean_D |x_G - D_teacher(x, sigma)|     (no gradient)
    L_DMD  = 1/2 mean_D || x_G - sg(x_G - grad) ||^2          (d L_DMD / d x_G = grad / D)

``D_phi - D_teacher`` is ``sigma^2 (s_fake - s_real)``, the gradient of ``KL(p_G || p_teacher)`` at noise level
``sigma``, so descent moves the student's samples from where it puts mass toward where the teacher does. The
DMD term starts at ``dmd_start`` (default: the end of the tangent warm-up, as in the paper).

Deviations from the paper: no CFG teacher data set (the sCD part trains on real data, as our sCD does); the
paper's loss scale of 100 on the sCM term is replaced by one ``dmd_weight`` on the DMD term; our sCD keeps its
adaptive log-variance weighting (the paper drops it for rCM); the fake score's optimiser is the trainer's
AdamW at ``fake_lr_scale`` times the learning rate (the paper: betas (0, 0.999), weight decay 0.01).
The adaptive weight multiplies the sCD gradient by ``e^{-u}``, which grows as the sCD residual shrinks, so no
fixed ``dmd_weight`` is the paper's balance at every step and dimension (where the paper's balance lies on the
ring, measured from gradient norms: ``docs/consistency.md``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.data.batch import Batch
from fewstep.errors import ConfigError
from fewstep.methods.base import Phase
from fewstep.methods.consistency.continuous_consistency import SCD, SCMConfig
from fewstep.methods.scores import (
    dmd_direction,
    fake_score_loss,
    generate,
    noised,
    pseudo_target_loss,
    shifted_sigma,
)
from fewstep.models.denoiser import Denoiser


@dataclass
class RCMConfig(SCMConfig):
    dmd_weight: float = 1.0
    dmd_start: int | None = None  # None: tangent_warmup
    dmd_shift: float = 5.0
    fake_updates: int = 1
    fake_lr_scale: float = 1.0
    max_generation_steps: int = 2


class ScoreRegularizedConsistency(SCD):
    """rCM: sCD with a DMD regulariser from a fake score of the student's samples."""

    name = "rcm"
    paper = "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency (NVIDIA 2025)"
    Config = RCMConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: RCMConfig):
        super().__init__(teacher, student, config)
        if config.dmd_weight < 0 or config.dmd_shift <= 0 or config.fake_updates < 1 or config.fake_lr_scale <= 0:
            raise ConfigError("rcm: need dmd_weight >= 0, dmd_shift > 0, fake_updates >= 1 and fake_lr_scale > 0")
        if config.max_generation_steps < 1:
            raise ConfigError(f"rcm: max_generation_steps must be >= 1, got {config.max_generation_steps}")
        if config.dmd_start is not None and config.dmd_start < 0:
            raise ConfigError(f"rcm: dmd_start must be >= 0, got {config.dmd_start}")
        self.fake_score = type(self).build_student(teacher, config, lambda: copy.deepcopy(student.backbone),
                                                   student.sigma_data)

    @property
    def dmd_start(self) -> int:
        return self.config.tangent_warmup if self.config.dmd_start is None else self.config.dmd_start

    def phases(self) -> list[Phase]:
        return [Phase("fake_score", list(self.fake_score.parameters()), self.config.fake_updates,
                      self.config.fake_lr_scale), *super().phases()]

    def dmd_sigma(self, batch: int, generator: torch.Generator, like: Tensor) -> Tensor:
        return shifted_sigma(batch, generator, like, self.config.dmd_shift, self.sigma_data)

    def generate(self, batch: int, cond, generator: torch.Generator, like: Tensor) -> Tensor:
        """Student samples with ``k ~ U{1..max_generation_steps}`` consistency steps on its own levels, gradient
        through the last network call only (:func:`~fewstep.methods.scores.generate`)."""
        k = 1 + int(torch.randint(self.config.max_generation_steps, (1,), generator=generator, device=like.device))
        noise = torch.randn((batch, *like.shape[1:]), generator=generator, device=like.device, dtype=like.dtype)
        return generate(self.student, noise, self.sampling(k).sigmas, cond, generator)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        if phase == "fake_score":
            with torch.no_grad():
                x_generated = self.generate(batch.x0.shape[0], batch.cond, generator, batch.x0)
            sigma = self.dmd_sigma(batch.x0.shape[0], generator, batch.x0)
            return {"loss": fake_score_loss(self.fake_score, x_generated, sigma, batch.cond, generator,
                                            self.sigma_data)}
        losses = super().losses(phase, batch, step, generator)
        if step < self.dmd_start or self.config.dmd_weight == 0:
            return losses
        dmd = self.dmd_loss(batch, generator)
        return {**losses, "loss": losses["loss"] + self.config.dmd_weight * dmd, "dmd": dmd.detach()}

    def dmd_loss(self, batch: Batch, generator: torch.Generator) -> Tensor:
        like, cond = batch.x0, batch.cond
        x_generated = self.generate(like.shape[0], cond, generator, like)
        sigma = self.dmd_sigma(like.shape[0], generator, like)
        with torch.no_grad():
            x = noised(x_generated, sigma, generator)
            direction = dmd_direction(x_generated, self.teacher(x, sigma, cond), self.fake_score(x, sigma, cond))
        return pseudo_target_loss(x_generated, direction)
