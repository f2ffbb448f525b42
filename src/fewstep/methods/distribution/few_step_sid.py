"""Few-step SiD: Zhou, Gu & Wang, "Few-Step Diffusion via Score identity Distillation", 2025.

One generator shared by ``K = generation_steps`` (4) steps, trained so that the uniform mixture of its ``K`` step
outputs matches the teacher (the paper's theory: matching the mixture needs no step-specific networks). Each
iteration draws a step ``k ~ U{1..K}``; the current generator runs the ``k - 1`` steps before it without gradient
from ``init_sigma z``, denoising and re-noising with fresh noise (backward simulation,
:func:`~fewstep.methods.scores.generate`), and the SiD loss of :mod:`fewstep.methods.distribution.sid` is applied
to the output ``x_g`` of step ``k``::

    levels   sigma_1 = init_sigma > sigma_2 > ... > sigma_K      (init_levels(K, init_sigma))
    x_g      = G_theta(x_0^(k-1) + sigma_k eps, sigma_k),         x_0^(0) + sigma_1 eps := sigma_1 z
    L_G      = mean_D[ (f_real - f_fake) * ((f_real - x_g) - alpha (f_real - f_fake)) ] / sg(mean_D |x_g - f_real|)

The fake score trains on the same mixture (each of its updates on one drawn step's outputs).

Levels: the SiD init-level schedule, :func:`~fewstep.methods.distribution.sid.init_levels`: ``K`` levels at
indices ``k * 1000 / K`` of a Karras schedule from ``init_sigma`` (2.5) down to 0.002 (2.5, 0.74, 0.17, 0.026 for
``K = 4``), so the first step is one-step SiD's generator; sampling at ``nfe`` uses ``init_levels(nfe)``, nested
(2 steps: 2.5, 0.17). Not DMD2's ``index_levels`` (first level 80).

Deviations from the paper: no Diffusion-GAN term and no Zero-/Anti-CFG guidance variants (data-free, unguided
fake score only); everything else as :class:`~fewstep.methods.distribution.sid.SiD`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.methods.distribution.sid import SiD, SiDConfig


@dataclass
class FewStepSiDConfig(SiDConfig):
    generation_steps: int = 4


class FewStepSiD(SiD):
    """Few-step SiD: SiD's loss on a uniformly drawn step of a ``generation_steps``-step generator."""

    name = "sid_fewstep"
    paper = "Zhou, Gu & Wang 2025, Few-Step Diffusion via Score identity Distillation"
    Config = FewStepSiDConfig
    few_step = True
