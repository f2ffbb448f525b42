"""SIM: Score Implicit Matching. Luo, Hu, Zhang, Sun, Li & Zhang, "One-Step Diffusion Distillation through Score
Implicit Matching", NeurIPS 2024.

A data-free one-step generator ``x_g = G_theta(z) = D_theta(sigma_init z, sigma_init)`` (as SiD's, ``init_sigma``
2.5) minimises a score divergence ``int w(t) E_{x_t ~ p_g,t} d(s_real(x_t) - s_g(x_t)) dt`` with a general distance
``d``. The score-projection identity turns its gradient into a loss that needs only an online fake score
``D_fake`` (trained as SiD's, :mod:`fewstep.methods.distribution.sid`) and the teacher. We implement it in x0
(denoiser) space, with the distance applied to the denoisers' difference ``y`` (the score difference times
``sigma^2``)::

    x_t = x_g + sigma eps,   sigma at r ~ U[0.2, 1] along the Karras schedule (as SiD)
    y   = sg(D_real(x_t) - D_fake(x_t))
    L_G = mean_D[ sg(d'(y)) * (D_real(x_t) - x_g) ]

``D_real(x_t) - x_g = sigma^2 (s_real(x_t) - grad log q(x_t | x_g))``; gradients flow through ``x_t`` (into the
teacher's forward pass; its parameters are frozen) and through ``x_g``; ``D_fake`` enters only through ``sg y``.
Distances (``distance``):

* ``pseudo_huber`` (default): ``d(y) = sqrt(mean_D y^2 + c^2) - c`` per sample, so
  ``d'(y) = y / sqrt(mean_D y^2 + c^2)`` (up to the constant ``1/D``): self-normalising, bounded for large
  discrepancies, squared-L2-like below ``c`` (``huber_c``, in the data's units, root-mean-square over dimensions);
* ``l2``: ``d(y) = mean_D y^2``, ``d'(y) = y`` weighted by ``1 / sg(mean_D |x_g - D_real(x_t)|)`` (DMD's and
  SiD's normalisation in place of ``w(t)``): SiD's loss with ``alpha = 0`` and the first factor stopped.

Sign: with ``y = s_real - s_fake`` (as here) the surrogate whose gradient is that of the divergence is
``+ d'(y)^T (s_real - grad log q(x_t | x_g))``; the reference notes' ``-`` goes with ``y = s_fake - s_real``.
Deviations from the paper: the pseudo-Huber distance acts on the x0 difference with a level-free ``c`` (on the
score difference it is ``c / sigma^2``), and ``w(t)`` is 1 (the pseudo-Huber derivative normalises each sample);
levels, fake score, betas (0, 0.999), 1:1 updates and the input level follow SiD; multi-step sampling uses SiD's
init levels, which this one-step generator was never trained on below ``init_sigma``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.errors import ConfigError
from fewstep.methods.distribution.sid import ScoreIdentityConfig, SiD
from fewstep.methods.scores import noised
from fewstep.models.denoiser import Denoiser
from fewstep.paths import bcast

DISTANCES = ("pseudo_huber", "l2")


@dataclass
class SIMConfig(ScoreIdentityConfig):
    distance: str = "pseudo_huber"
    huber_c: float = 0.03


def sim_loss(x_generated: Tensor, real: Tensor, fake: Tensor, distance: str, huber_c: float) -> Tensor:
    """SIM's generator loss (module docstring), batch mean; gradients flow through ``x_generated`` and ``real``
    (``fake`` is used without gradient)."""
    y = (real - fake).detach()
    if distance == "pseudo_huber":
        weight = y.pow(2).flatten(1).mean(1).add(huber_c**2).rsqrt()
    else:
        weight = 1 / (x_generated - real).detach().abs().flatten(1).mean(1).clamp(min=1e-5)
    return (bcast(weight, y) * y * (real - x_generated)).flatten(1).mean(1).mean()


class SIM(SiD):
    """SIM: a data-free one-step generator trained by score implicit matching with a pseudo-Huber distance."""

    name = "sim"
    paper = "Luo et al. 2024, One-Step Diffusion Distillation through Score Implicit Matching"
    Config = SIMConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: SIMConfig):
        super().__init__(teacher, student, config)
        if config.distance not in DISTANCES:
            raise ConfigError(f"method_args.distance must be one of {', '.join(DISTANCES)}, got {config.distance!r}")
        if config.huber_c <= 0:
            raise ConfigError(f"method_args.huber_c must be > 0, got {config.huber_c}")

    def dmd_loss(self, x_generated: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = self.loss_levels(x_generated, generator)
        x = noised(x_generated, sigma, generator)
        with torch.no_grad():
            fake = self.fake_score(x, sigma, cond)
        return sim_loss(x_generated, self.teacher(x, sigma, cond), fake, self.config.distance, self.config.huber_c)
