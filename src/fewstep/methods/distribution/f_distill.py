"""f-distill: Xu, Nie & Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching", 2025
(NVIDIA; reference code NVlabs/FastGen, ``methods/distribution_matching/f_distill.py``).

DMD2 (:mod:`fewstep.methods.distribution.dmd2`) generalised from the reverse KL to an f-divergence
``D_f(p || q) = E_q f(p / q)`` between the teacher's distribution ``p`` and the student's ``q``. Its gradient is
the reverse-KL (DMD) gradient weighted per sample by ``h(r) = f''(r) r^2`` of the density ratio ``r = p / q``
at the noised sample, so a less mode-seeking divergence (``h`` growing with ``r``) pushes harder where the teacher
has more mass than the student. Per generator update, with ``x_G`` the generator's sample::

    x = x_G + sigma eps,   sigma ~ Karras grid [min_level, max_level] by index
    g = (D_fake(x, sigma) - D_real(x, sigma)) / mean_D |x_G - D_real(x, sigma)|             (DMD's direction)
    r = clamp(exp(clamp(l(x, sigma), -10, 10)), 0.1, 20)                     (l: the discriminator's logit)
    w = h(r) / mean_batch h(r)
    L = 1/2 mean_D || x_G - sg(x_G - w g) ||^2  +  gan_generator_weight softplus(-l(x_G + sigma' eps', sigma'))

with no gradient through ``g`` or ``w``. A logistic discriminator trained on noised real data against noised
generator samples has the optimal logit ``log p_sigma(x) / q_sigma(x)``, hence ``r = exp(l)``. ``h`` by
``divergence``: reverse_kl 1 (DMD2 exactly), forward_kl ``r``, js ``r / (1 + r)`` (the paper's best, the
default), squared_hellinger ``sqrt r``, jeffreys ``1 + r``, sf ``1 / (1 + r)``, neyman ``1 / r`` (constant
factors dropped: the batch mean removes them). The critic phase is DMD2's (fake-score denoising plus the
discriminator's logistic loss on real data), as is the generator's GAN term.

Deviations from the paper:

* The discriminator is DMD2's head on the *fake* network's middle feature (trained with it), not heads on the
  frozen teacher's features: an analytic teacher has no features. The generator's fake-score pass gives both
  ``D_fake(x, sigma)`` and the logit ``l(x, sigma)`` used for ``r``.
* ``r`` is not normalised by a per-level EMA of itself (the code's option, off by default there).
* ``h`` is normalised by the mean over this process's batch, not all-reduced over processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.methods.distribution.dmd2 import DMD2, DMD2Config
from fewstep.methods.scores import (
    WEIGHTINGS,
    check_divergence,
    density_ratio,
    dmd_direction,
    karras_index_sigma,
    noised,
    pseudo_target_loss,
)
from fewstep.models.denoiser import Denoiser
from fewstep.nets.features import capture_features, pooled
from fewstep.paths import bcast


def divergence_weight(divergence: str, logit: Tensor) -> Tensor:
    """The per-sample weight ``h(r) / mean_batch h(r)`` of ``divergence`` with ``r`` from :func:`density_ratio`."""
    h = WEIGHTINGS[divergence](density_ratio(logit))
    return h / h.mean()


@dataclass
class FDistillConfig(DMD2Config):
    divergence: str = "js"


class FDistill(DMD2):
    """f-distill: DMD2 whose distribution-matching gradient is weighted per sample by ``h(r)`` of an f-divergence."""

    name = "f_distill"
    family = "distribution"
    paper = "Xu, Nie & Vahdat 2025, One-step Diffusion Models with f-Divergence Distribution Matching"
    Config = FDistillConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: FDistillConfig):
        check_divergence(config.divergence, config.gan_critic_weight)
        super().__init__(teacher, student, config)

    def scores(self, x: Tensor, sigma: Tensor, cond) -> tuple[Tensor, Tensor, Tensor]:
        """``(D_real(x, sigma), D_fake(x, sigma), l(x, sigma))``: the discriminator's logit read from the same
        fake-network pass."""
        real = self.teacher(x, sigma, cond)
        with capture_features(self.fake_score, [self.feature]) as features:
            fake = self.fake_score(x, sigma, cond)
        return real, fake, self.head(pooled(features)).squeeze(1)

    def dmd_loss(self, x_generated: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = karras_index_sigma(x_generated.shape[0], generator, x_generated, self.config.min_level,
                                   self.config.max_level)
        with torch.no_grad():
            x = noised(x_generated, sigma, generator)
            real, fake, logit = self.scores(x, sigma, cond)
            weight = divergence_weight(self.config.divergence, logit)
            direction = dmd_direction(x_generated, real, fake) * bcast(weight, x_generated)
        return pseudo_target_loss(x_generated, direction)
