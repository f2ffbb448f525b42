"""Diff-Instruct: Luo, Hu, Zhang, Sun, Li & Zhang, "Diff-Instruct: A Universal Approach for Transferring Knowledge
From Pre-trained Diffusion Models", NeurIPS 2023 (code pkulwj1994/diff_instruct).

A one-step generator ``G_theta(z) = D_theta(init_sigma z, init_sigma)`` minimises the integral KL divergence
``int w(sigma) KL(q_theta,sigma || p_sigma) dsigma`` between its noised distribution and the teacher's. Its
gradient is the score difference at the generator's noised samples, pushed through ``x_G``; the released EDM code
takes ``w = 1`` in x0 terms and no per-sample normalisation (DMD's normalisation came later)::

    fake score:  L_fake = lambda(sigma) mean_D || D_fake(sg x_G + sigma eps, sigma) - sg x_G ||^2
    generator:   L_G    = mean_batch sum_D  sg( D_fake(x, sigma) - D_real(x, sigma) ) * x_G,   x = x_G + sigma eps

with ``log sigma ~ N(p_mean, p_std^2)`` (EDM's training levels, -1.2 and 1.2) for both losses, one fake-score update
per generator update, and the fake score a copy of the teacher (of the student's network for an analytic
teacher). ``d L_G / d x_G`` is the score difference itself, so its scale follows ``sigma``: the pitfall DMD's
normalisation removes. Data-free (``needs = {noise}``).

Deviations from the code: the generator's level ``init_sigma`` defaults to 1.0 as the README's command, and
multi-step sampling (not in the paper) scales DMD's index levels to start there; ``fake_warmup`` steps in which only
the fake score learns, for an analytic teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.data.batch import Batch, CompositeBatch
from fewstep.errors import ConfigError
from fewstep.methods.distribution.matching import DistributionMatching, DistributionMatchingConfig
from fewstep.methods.scores import fake_score_loss, log_normal_sigma, noised
from fewstep.models.denoiser import Denoiser


@dataclass
class DiffInstructConfig(DistributionMatchingConfig):
    init_sigma: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2


class DiffInstruct(DistributionMatching):
    """Diff-Instruct: integral-KL gradient from a fake score, unnormalised, on a data-free one-step generator."""

    name = "diff_instruct"
    paper = "Luo et al. 2023, Diff-Instruct"
    needs = frozenset({"noise"})
    Config = DiffInstructConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: DiffInstructConfig):
        super().__init__(teacher, student, config)
        if config.p_std <= 0:
            raise ConfigError(f"method_args.p_std must be > 0, got {config.p_std}")

    def levels(self, like: Tensor, generator: torch.Generator) -> Tensor:
        return log_normal_sigma(like.shape[0], generator, like, self.config.p_mean, self.config.p_std)

    def critic_losses(self, batch: Batch | CompositeBatch, source: Batch,
                      generator: torch.Generator) -> dict[str, Tensor]:
        with torch.no_grad():
            x_generated = self.generated(source.noise, source.cond, generator)
        sigma = self.levels(x_generated, generator)
        return {"loss": fake_score_loss(self.fake_score, x_generated, sigma, source.cond, generator, self.sigma_data)}

    def dmd_loss(self, x_generated: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = self.levels(x_generated, generator)
        with torch.no_grad():
            x = noised(x_generated, sigma, generator)
            difference = self.fake_score(x, sigma, cond) - self.teacher(x, sigma, cond)
        return (difference * x_generated).flatten(1).sum(1).mean()

