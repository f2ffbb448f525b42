"""SiD: Score identity Distillation. Zhou, Zheng, Wang, Yin & Huang, "Score identity Distillation: Exponentially
Fast Distillation of Pretrained Diffusion Models for One-Step Generation", ICML 2024 (code mingyuanzhou/SiD,
``training/sid_loss.py``).

A data-free one-step generator ``x_g = G_theta(z) = D_theta(sigma_init z, sigma_init)`` (the teacher's network,
EDM-preconditioned, fed noise at ``init_sigma`` 2.5 rather than at the top level) learns against a fake score
``D_fake`` that tracks its distribution. Two phases per cycle, one update each, both with Adam betas (0, 0.999):

**Fake score**: EDM's denoising loss on ``sg x_g``, levels ``ln sigma ~ N(-1.2, 1.2^2)`` (``fake_p_mean``,
``fake_p_std``)::

    L_fake = lambda(sigma) mean_D || D_fake(sg x_g + sigma eps, sigma) - sg x_g ||^2,
    lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2

**Generator**: with ``sigma`` at ``r ~ U[0.2, 1]`` along the Karras schedule (SiD's ``u = 1 - r ~ U[0, 0.8]``,
:func:`~fewstep.methods.scores.karras_position_sigma`; sigma from 0.002 to about 24),
``x_sigma = x_g + sigma eps``, ``f_real = D_real(x_sigma)`` and ``f_fake = D_fake(x_sigma)``::

    L_G = mean_D[ (f_real - f_fake) * ((f_real - x_g) - alpha (f_real - f_fake)) ] / sg(mean_D |x_g - f_real|)

Gradients flow through ``x_sigma`` into both networks (their parameters frozen for this loss, their forward passes
differentiated) and through ``x_g``; this is not DMD's stopped-gradient direction. ``alpha`` is 1.2, the paper's
best (1.0 also reported). The generator's term is logged as ``dmd``, as DMD's and DMD2's are.

Deviations from the code: per-sample means over the data dimensions instead of sums (a constant factor); no NaN
filtering of samples (the trainer's divergence guard stops a run that produces them); ``r`` is drawn in float64
on our Karras schedule (the same schedule as the code's, rho 7, 0.002 to 80); gradient clipping and the rest of
the optimiser settings come from the run (``train.*``), except the betas (``betas``); an optional
``fake_warmup`` of steps in which only the fake score learns (for an analytic teacher, whose fake score starts from
a random network). Multi-step sampling of this one-step generator uses :func:`init_levels`, whose levels below
``init_sigma`` it was never trained on; :mod:`fewstep.methods.distribution.few_step_sid` trains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fewstep.data.batch import Batch, CompositeBatch
from fewstep.errors import ConfigError
from fewstep.methods.base import Phase
from fewstep.methods.distribution.matching import DistributionMatching, DistributionMatchingConfig
from fewstep.methods.scores import (
    GRID_SIZE,
    fake_score_loss,
    frozen,
    karras_position_sigma,
    log_normal_sigma,
    noised,
)
from fewstep.models.denoiser import Denoiser
from fewstep.solvers import SIGMA_MIN, karras_sigmas


@dataclass
class ScoreIdentityConfig(DistributionMatchingConfig):
    """What SiD, few-step SiD and SIM share: the generator's input level (2.5, not the top), Adam betas for both
    networks, the fake score's lognormal levels, and the generator loss's part ``[min_level, max_level]`` of the
    Karras schedule (0 the top, 80; 1 the bottom, 0.002)."""

    init_sigma: float = 2.5
    betas: tuple[float, float] = (0.0, 0.999)
    fake_p_mean: float = -1.2
    fake_p_std: float = 1.2
    min_level: float = 0.2
    max_level: float = 1.0


@dataclass
class SiDConfig(ScoreIdentityConfig):
    alpha: float = 1.2


def init_levels(nfe: int, init_sigma: float) -> list[float]:
    """``nfe`` generator levels at indices ``k * 1000 / nfe`` of a 1000-level Karras schedule from ``init_sigma``
    down to 0.002 (the first is ``init_sigma``): nested like :func:`~fewstep.methods.scores.index_levels`."""
    grid = karras_sigmas(GRID_SIZE, SIGMA_MIN, init_sigma)
    return [float(grid[k * GRID_SIZE // nfe]) for k in range(nfe)]


def sid_loss(x_generated: Tensor, real: Tensor, fake: Tensor, alpha: float) -> Tensor:
    """SiD's generator loss (module docstring), batch mean, from the generator's samples and both denoisers'
    predictions on their noised copies; gradients flow through all three."""
    scale = (x_generated - real).detach().abs().flatten(1).mean(1).clamp(min=1e-5)
    difference = real - fake
    loss = (difference * ((real - x_generated) - alpha * difference)).flatten(1).mean(1)
    return (loss / scale).mean()


class SiD(DistributionMatching):
    """SiD: a data-free one-step generator trained by the score-identity loss against a fake score."""

    name = "sid"
    paper = "Zhou et al. 2024, Score identity Distillation"
    needs = frozenset({"noise"})
    Config = SiDConfig
    few_step: ClassVar[bool] = False  # whether generation_steps > 1 is allowed

    def __init__(self, teacher: Denoiser, student: Denoiser, config: ScoreIdentityConfig):
        super().__init__(teacher, student, config)
        if not self.few_step and config.generation_steps != 1:
            raise ConfigError(f"method_args.generation_steps: {self.name} is one-step (use sid_fewstep for more)")
        if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
            raise ConfigError(f"method_args.betas must be two numbers in [0, 1), got {config.betas}")
        if config.fake_p_std <= 0:
            raise ConfigError(f"method_args.fake_p_std must be > 0, got {config.fake_p_std}")
        if isinstance(config, SiDConfig) and config.alpha < 0:
            raise ConfigError(f"method_args.alpha must be >= 0, got {config.alpha}")

    def phases(self) -> list[Phase]:
        betas = tuple(self.config.betas)
        return [Phase("fake_score", list(self.fake_score.parameters()), self.config.fake_updates,
                      self.config.fake_lr_scale, betas=betas),
                Phase("student", list(self.student.parameters()), betas=betas)]

    def generator_levels(self, nfe: int) -> list[float]:
        """The generator's levels at ``nfe`` steps (:func:`init_levels`), used for training (a step drawn
        uniformly, reached by backward simulation) and sampling."""
        return init_levels(nfe, self.config.init_sigma)

    def critic_losses(self, batch: Batch | CompositeBatch, source: Batch,
                      generator: torch.Generator) -> dict[str, Tensor]:
        with torch.no_grad():
            x_generated = self.generated(source.noise, source.cond, generator)
        sigma = log_normal_sigma(x_generated.shape[0], generator, x_generated, self.config.fake_p_mean,
                                 self.config.fake_p_std)
        return {"loss": fake_score_loss(self.fake_score, x_generated, sigma, source.cond, generator, self.sigma_data)}

    def loss_levels(self, x_generated: Tensor, generator: torch.Generator) -> Tensor:
        """The generator loss's levels: uniform positions in ``[min_level, max_level]`` of the Karras schedule."""
        return karras_position_sigma(x_generated.shape[0], generator, x_generated, self.config.min_level,
                                     self.config.max_level)

    def dmd_loss(self, x_generated: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = self.loss_levels(x_generated, generator)
        x = noised(x_generated, sigma, generator)
        with frozen(self.fake_score):
            return sid_loss(x_generated, self.teacher(x, sigma, cond), self.fake_score(x, sigma, cond),
                            self.config.alpha)

