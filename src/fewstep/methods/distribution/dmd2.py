"""DMD2: Yin, Gharbi, Park, Zhang, Shechtman, Durand & Freeman, "Improved Distribution Matching Distillation for
Fast Image Synthesis", NeurIPS 2024 (code tianweiy/DMD2).

DMD (:mod:`fewstep.methods.distribution.dmd`) without its regression loss and pair set, made stable by three
changes. With ``x_G`` the generator's sample and ``g`` DMD's normalised gradient
(:mod:`fewstep.methods.scores`):

1. **Two time-scale updates**: the fake score takes ``fake_updates`` (5) updates per generator update, so it
   tracks the generator instead of lagging behind it (the cause of DMD's instability without regression).
2. **A GAN term** on the fake score's own features: a small head ``h`` reads the fake network's middle feature
   (:func:`~fewstep.nets.features.capture_features`) at a random level of the whole grid, on noised real data
   and noised generator samples (a diffusion GAN); non-saturating logistic losses::

       critic:    L_fake + gan_critic_weight  [ softplus(h(x_G + sigma eps)) + softplus(-h(x_real + sigma eps)) ]
       generator: 1/2 mean_D || x_G - sg(x_G - g) ||^2  +  gan_generator_weight  softplus(-h(x_G + sigma eps))

   The head is trained with the fake score (its gradient also reaches the fake network); the generator's GAN
   gradient flows through the fake network into ``x_G``.
3. **Backward simulation** for ``generation_steps > 1``: a level ``k`` of the schedule is drawn, the current
   generator runs ``k`` steps from pure noise without gradient, and the step at level ``k`` is trained, so
   training sees the inputs sampling will.

Deviations from the code: the head is two linear layers on the pooled middle feature (the paper's is
strided convolutions on the UNet bottleneck); AdamW settings come from the run (``train.*``), with the critic at
``fake_lr_scale`` times the learning rate; levels are the Karras grid's (the EDM variant of the code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fewstep.data.batch import Batch, CompositeBatch
from fewstep.errors import ConfigError
from fewstep.methods.base import Phase
from fewstep.methods.distribution.matching import DistributionMatching, DistributionMatchingConfig
from fewstep.methods.scores import fake_score_loss, karras_index_sigma, noised
from fewstep.models.denoiser import Denoiser
from fewstep.nets.features import capture_features, feature_points, pooled


@dataclass
class DMD2Config(DistributionMatchingConfig):
    fake_updates: int = 5
    gan_critic_weight: float = 1e-2
    gan_generator_weight: float = 3e-3
    head_width: int = 128
    feature: str | None = None  # the fake network's feature the head reads (default: its middle feature point)


class DMD2(DistributionMatching):
    """DMD2: DMD with two time-scale updates, a GAN head on the fake score, and backward simulation."""

    name = "dmd2"
    paper = "Yin et al. 2024, Improved Distribution Matching Distillation for Fast Image Synthesis"
    needs = frozenset({"noise", "data"})
    Config = DMD2Config

    def __init__(self, teacher: Denoiser, student: Denoiser, config: DMD2Config):
        super().__init__(teacher, student, config)
        if config.gan_critic_weight < 0 or config.gan_generator_weight < 0 or config.head_width < 1:
            raise ConfigError("method_args: need gan_critic_weight >= 0, gan_generator_weight >= 0, head_width >= 1")
        points = feature_points(self.fake_score)
        self.feature = config.feature if config.feature is not None else points[len(points) // 2]
        with torch.no_grad(), capture_features(self.fake_score, [self.feature]) as features:
            probe = torch.zeros(1, *student.data_shape, dtype=next(student.parameters()).dtype,
                                device=next(student.parameters()).device)
            self.fake_score(probe, torch.ones(1, dtype=probe.dtype, device=probe.device), None)
        width = pooled(features).shape[1]
        self.head = nn.Sequential(nn.Linear(width, config.head_width), nn.SiLU(), nn.Linear(config.head_width, 1))
        self.head.to(probe)

    def phases(self) -> list[Phase]:
        critic = list(self.fake_score.parameters()) + list(self.head.parameters())
        return [Phase("fake_score", critic, self.config.fake_updates, self.config.fake_lr_scale),
                Phase("student", list(self.student.parameters()))]

    def logit(self, x: Tensor, cond, generator: torch.Generator) -> Tensor:
        """The head's logit on ``x`` noised to a random level of the whole grid, from the fake network's feature."""
        sigma = karras_index_sigma(x.shape[0], generator, x)
        with capture_features(self.fake_score, [self.feature]) as features:
            self.fake_score(noised(x, sigma, generator), sigma, cond)
        return self.head(pooled(features)).squeeze(1)

    def critic_losses(self, batch: CompositeBatch, source: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        with torch.no_grad():
            x_generated = self.generated(source.noise, source.cond, generator)
        sigma = karras_index_sigma(x_generated.shape[0], generator, x_generated)
        denoising = fake_score_loss(self.fake_score, x_generated, sigma, source.cond, generator, self.sigma_data)
        if self.config.gan_critic_weight == 0:
            return {"loss": denoising}
        real = batch["data"]
        gan = (F.softplus(self.logit(x_generated, source.cond, generator)).mean()
               + F.softplus(-self.logit(real.x0, real.cond, generator)).mean())
        return {"loss": denoising + self.config.gan_critic_weight * gan, "denoising": denoising.detach(),
                "gan_critic": gan.detach()}

    def extra_generator_losses(self, batch: CompositeBatch, x_generated: Tensor, cond,
                               generator: torch.Generator) -> dict[str, Tensor]:
        if self.config.gan_generator_weight == 0:
            return {}
        gan = F.softplus(-self.logit(x_generated, cond, generator)).mean()
        return {"gan_generator": self.config.gan_generator_weight * gan}
