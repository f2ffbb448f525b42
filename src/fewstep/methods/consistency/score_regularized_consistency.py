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
from fewstep.methods.losses import edm_weight
from fewstep.models.denoiser import Denoiser
from fewstep.paths import bcast
from fewstep.solvers import SIGMA_MAX, sample_consistency


@dataclass
class RCMConfig(SCMConfig):
    dmd_weight: float = 1.0
    dmd_start: int | None = None  # None: tangent_warmup
    dmd_shift: float = 5.0
    fake_updates: int = 1
    fake_lr_scale: float = 1.0
    max_generation_steps: int = 2


def dmd_direction(x_generated: Tensor, real: Tensor, fake: Tensor) -> Tensor:
    """DMD's normalised gradient ``(fake - real) / mean_D |x_G - real|`` per sample (float64-safe)."""
    scale = (x_generated - real).abs().flatten(1).mean(1).clamp(min=1e-8)
    return (fake - real) / bcast(scale, fake)


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
        """Noise levels of the DMD term: ``sigma_d s / (1 - s)`` with ``s`` the shifted uniform draw."""
        u = 0.02 + 0.96 * torch.rand(batch, generator=generator, device=like.device).to(like.dtype)
        a = self.config.dmd_shift
        s = a * u / (1 + (a - 1) * u)
        return (self.sigma_data * s / (1 - s)).clamp(max=SIGMA_MAX)

    def generate(self, batch: int, cond, generator: torch.Generator, like: Tensor) -> Tensor:
        """Student samples with ``k ~ U{1..max_generation_steps}`` consistency steps on its own levels
        (:func:`~fewstep.solvers.sample_consistency` down to the last level, then one network call that records
        gradients when they are enabled)."""
        k = 1 + int(torch.randint(self.config.max_generation_steps, (1,), generator=generator, device=like.device))
        levels = self.sampling(k).sigmas
        x = levels[0] * torch.randn((batch, *like.shape[1:]), generator=generator, device=like.device,
                                    dtype=like.dtype)
        if k > 1:
            x0 = sample_consistency(lambda y, s: self.student(y, s, cond), x, torch.tensor(levels[:-1]), generator)
            x = x0 + levels[-1] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.student(x, torch.full((batch,), levels[-1], device=x.device, dtype=x.dtype), cond)

    def losses(self, phase: str, batch: Batch, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        if phase == "fake_score":
            return self.fake_score_loss(batch, generator)
        losses = super().losses(phase, batch, step, generator)
        if step < self.dmd_start or self.config.dmd_weight == 0:
            return losses
        dmd = self.dmd_loss(batch, generator)
        return {**losses, "loss": losses["loss"] + self.config.dmd_weight * dmd, "dmd": dmd.detach()}

    def fake_score_loss(self, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        like, cond = batch.x0, batch.cond
        with torch.no_grad():
            x_generated = self.generate(like.shape[0], cond, generator, like)
        sigma = self.dmd_sigma(like.shape[0], generator, like)
        noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        x = x_generated + bcast(sigma, like) * noise
        error = (self.fake_score(x, sigma, cond) - x_generated).flatten(1).pow(2).mean(1)
        return {"loss": (edm_weight(sigma, self.sigma_data) * error).mean()}

    def dmd_loss(self, batch: Batch, generator: torch.Generator) -> Tensor:
        like, cond = batch.x0, batch.cond
        x_generated = self.generate(like.shape[0], cond, generator, like)
        sigma = self.dmd_sigma(like.shape[0], generator, like)
        with torch.no_grad():
            noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
            x = x_generated + bcast(sigma, like) * noise
            real, fake = self.teacher(x, sigma, cond), self.fake_score(x, sigma, cond)
            target = x_generated - dmd_direction(x_generated, real, fake)
        return 0.5 * (x_generated - target).flatten(1).pow(2).mean(1).mean()
