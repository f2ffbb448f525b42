"""Uni-Instruct: Wang, Bai, Zhang, Zhang, Luo & Sun, "Uni-Instruct: One-step Diffusion Model through Unified
Diffusion Divergence Instruction", NeurIPS 2025.

A one-step generator trained to minimise the *diffusion expansion* of an f-divergence
``D_f(p || q) = E_q f(p / q)`` between the teacher's distribution ``p`` and the student's ``q``. Along the forward
diffusion both are noised, ``d/dt D_f(p_t || q_t) = -(g^2 / 2) E_{q_t}[ h(r_t) || s_p - s_q ||^2 ]`` with
``r_t = p_t / q_t`` and ``h(r) = f''(r) r^2``, so the divergence is an integral over noise levels of::

    F_sigma(theta) = sigma^4 E_{x ~ q_theta,sigma}[ h(r(x)) || s_p(x) - s_q(x) ||^2 ]
                   = E_{x ~ q_theta,sigma}[ h(r(x)) || D_real(x, sigma) - D_fake(x, sigma) ||^2 ]

(``sigma^4`` puts it in x0 units). ``F`` depends on ``theta`` through the samples and through the functions
``q``, ``s_q`` and ``r``; its gradient is intractable as written. Writing the variation of ``q`` as
``d log q`` and using the score-projection identity ``E_q[v . s_q] = E[v(x_sigma) . grad log q(x_sigma | x_G)]``
(as SIM does) gives a loss whose gradient equals ``grad F_sigma`` when ``D_fake`` is the student's exact denoiser
and ``r`` the exact ratio (our derivation; the paper's Theorem 3.2 gives a gradient-equivalent loss of this kind,
whose coefficient functions we did not have to compare)::

    x   = x_G + sigma eps,   delta = D_real(x, sigma) - D_fake(x, sigma)
    l   = 2 h(r) delta . (D_fake(x, sigma) - x_G)  -  c(r) || delta ||^2,      c(r) = r h'(r) - h(r)
    L_G = mean_batch( mean_D l / sg(mean_D |x_G - D_real(x, sigma)|) ) / sg(mean_batch h(r))

with gradients through ``x_G`` and through ``x`` into the teacher, the fake score and the discriminator (their
parameters frozen for this loss: only their inputs are differentiated), and ``r`` read from the discriminator's
logit at ``x``. The first term's ``-2 h(r) delta . x_G`` part is Diff-Instruct's/DMD's gradient weighted by
``h(r)`` (the paper's Grad(DI) part); the rest, differentiated through ``x``, is the SIM/SiD kind (Grad(SIM)).
Special cases: reverse KL (``h = 1``, ``c = -1``) gives ``delta . (D_real + D_fake - 2 x_G)``, SiD's loss at
``alpha = 0.5`` times 2, and needs no discriminator; forward KL (``h = r``, ``c = 0``) has no squared term.
``divergence`` picks ``h`` from :data:`~fewstep.methods.scores.WEIGHTINGS` (those of f-distill): reverse_kl,
forward_kl (the default: the paper's ImageNet-64 best), js, squared_hellinger, jeffreys, sf, neyman.

The critic phase is DMD2's (:mod:`fewstep.methods.distribution.dmd2`): ``fake_updates`` fake-score denoising
updates plus a logistic discriminator head on the fake network's middle feature, trained on noised real data
against noised generator samples, whose optimal logit is ``log r``; the generator also gets DMD2's GAN term.

What is exact and what is approximated:

* exact: the per-level gradient of ``F_sigma`` given the two denoisers and ``r`` (checked against the
  closed-form gradient on Gaussians for reverse and forward KL, in the generator's mean and scale);
* approximated: ``r`` and its gradient in ``x`` come from the discriminator (clamped as f-distill's:
  ``exp(clamp(logit, -10, 10))`` in [0.1, 20], where its gradient is then zero); ``D_fake`` lags the generator;
  the time weight ``w(sigma)`` is DMD's per-sample normalisation, not the paper's; levels are drawn from
  ``[min_level, max_level]`` of the Karras grid by index, so the expansion's top boundary term
  ``D_f(p_T || q_T)`` and the levels outside are dropped;
* not implemented: the paper's text-to-3D use and any guidance on the fake score.

Deviations from the paper: its coefficient functions were not available to us, so the loss above is our own
derivation of the same gradient (unit-tested); the discriminator is DMD2's head on the fake network's feature
(trained with it), not heads on the teacher's features; ``h`` and ``c`` are divided by the batch mean of ``h``
as f-distill does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.methods.distribution.dmd2 import DMD2, DMD2Config
from fewstep.methods.scores import WEIGHTINGS, check_divergence, density_ratio, frozen, noised
from fewstep.models.denoiser import Denoiser
from fewstep.nets.features import capture_features, pooled

# c(r) = r h'(r) - h(r) for each h of WEIGHTINGS: the coefficient of the squared score difference.
SQUARED_TERM: dict[str, Callable[[Tensor], Tensor]] = {
    "reverse_kl": lambda r: -torch.ones_like(r),
    "forward_kl": torch.zeros_like,
    "js": lambda r: -(r / (1 + r)) ** 2,
    "squared_hellinger": lambda r: -0.5 * torch.sqrt(r),
    "jeffreys": lambda r: -torch.ones_like(r),
    "sf": lambda r: -(1 + 2 * r) / (1 + r) ** 2,
    "neyman": lambda r: -2 / r,
}


def expanded_divergence_loss(x_generated: Tensor, real: Tensor, fake: Tensor, ratio: Tensor,
                             divergence: str) -> Tensor:
    """Per sample, ``2 h(r) delta . (fake - x_G) - c(r) || delta ||^2`` (``delta = real - fake``), summed over the
    data dimensions: the gradient of its mean is that of ``E_q[h(r) || D_real - D_fake ||^2]`` at one level when
    ``real``, ``fake`` and ``ratio`` are differentiated through the noised sample (module docstring)."""
    delta = (real - fake).flatten(1)
    h, c = WEIGHTINGS[divergence](ratio), SQUARED_TERM[divergence](ratio)
    return 2 * h * (delta * (fake - x_generated).flatten(1)).sum(1) - c * delta.pow(2).sum(1)


@dataclass
class UniInstructConfig(DMD2Config):
    divergence: str = "forward_kl"


class UniInstruct(DMD2):
    """Uni-Instruct: a one-step generator descending the diffusion expansion of an f-divergence."""

    name = "uni_instruct"
    paper = "Wang et al. 2025, Uni-Instruct: One-step Diffusion Model through Unified Diffusion Divergence Instruction"
    Config = UniInstructConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: UniInstructConfig):
        check_divergence(config.divergence, config.gan_critic_weight)
        super().__init__(teacher, student, config)

    def scores(self, x: Tensor, sigma: Tensor, cond) -> tuple[Tensor, Tensor, Tensor]:
        """``(D_real, D_fake, r)`` at ``x``, differentiable in ``x`` (call under :func:`frozen`); ``r`` from the
        discriminator's logit read in the same fake-network pass (1 for reverse KL, which needs none)."""
        real = self.teacher(x, sigma, cond)
        if self.config.divergence == "reverse_kl":
            return real, self.fake_score(x, sigma, cond), torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        with capture_features(self.fake_score, [self.feature]) as features:
            fake = self.fake_score(x, sigma, cond)
        return real, fake, density_ratio(self.head(pooled(features)).squeeze(1))

    def dmd_loss(self, x_generated: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = self.loss_levels(x_generated, generator)
        x = noised(x_generated, sigma, generator)
        with frozen(self.fake_score), frozen(self.head):
            real, fake, ratio = self.scores(x, sigma, cond)
        loss = expanded_divergence_loss(x_generated, real, fake, ratio, self.config.divergence)
        scale = (x_generated - real).detach().abs().flatten(1).mean(1).clamp(min=1e-5) * loss.new_tensor(
            x_generated[0].numel())
        return (loss / scale).mean() / WEIGHTINGS[self.config.divergence](ratio).detach().mean()
