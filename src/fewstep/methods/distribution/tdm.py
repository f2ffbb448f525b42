"""TDM: Luo, Hu, Zhang, Sun, Li & Zhang (Luo Yihong et al.), "Learning Few-Step Diffusion Models by Trajectory
Distribution Matching", ICCV 2025 (code Luo-Yihong/TDM, ``train_tdm_demo.py``).

A data-free ``K``-step student (``generation_steps``, 4) that samples deterministically, DDIM (an Euler step of
the probability-flow ODE with its own prediction) on its own levels ``sigma_1 > ... > sigma_K`` (DMD2's index
levels scaled to start at ``init_sigma``) and ``sigma_{K+1} = 0``::

    x_1 = sigma_1 z,   x0_k = G_theta(x_k, sigma_k),   x_{k+1} = x0_k + (sigma_{k+1} / sigma_k)(x_k - x0_k)

Trajectory distribution matching: step ``k``'s prediction is matched to the teacher *in distribution* only at
the levels of its own segment ``[sigma_{k+1}, sigma_k]`` of the trajectory (the sampling-steps-aware objective:
each step is asked only for what its segment needs, the next steps refine the rest). Per update, each sample
draws a step ``k`` uniformly; the current student runs the ``k - 1`` deterministic steps before it without
gradient, then step ``k`` with gradient::

    tau    ~ Karras grid indices of segment k, by index (within [min_level, max_level] of the grid)
    x      = x0_k + tau eps
    g      = (D_fake(x, tau) - D_real(x, tau)) / mean_D |x0_k - D_real(x, tau)|                 (no gradient)
    L_G    = 1/2 mean_D || x0_k - sg(x0_k - g) ||^2
    L_fake = lambda(tau) mean_D || D_fake(sg x0_k + tau eps, tau) - sg x0_k ||^2                 (EDM weight)

Because the segments are disjoint, the fake score's level tells which step's predictions it models: one fake
network holds all ``K`` of them. If ``x0_k`` noised to every level of its segment matches the teacher's marginal,
the next point ``x_{k+1} = x0_k + sigma_{k+1} eps_hat`` matches it at ``sigma_{k+1}`` to the extent that the
student's own noise estimate ``eps_hat`` is Gaussian and independent of ``x0_k``.

Deviations from the paper and its code:

* the sample the scores see is ``x0_k`` with fresh noise at ``tau``; TDM moves deterministically to the segment's
  lower end with the student's ``eps_hat`` and adds fresh noise from there to ``tau``, and then corrects the fake
  score's loss by an importance weight for that mixed noise (which ours does not need);
* no classifier-free-guidance split of the target (no guided teacher here), no ``use_randmid`` randomised lower
  end and no pseudo-Huber option; the EDM weight on the fake loss instead of ``min(SNR, 5)``;
* full networks, not LoRAs; the levels are the Karras grid's, not DDPM's timesteps 799, 599, 399, 199; the
  first level is ``init_sigma`` (80 by default) where the demo starts at t = 799;
* the code's Adam betas (0, 0.95), 1:1 updates and fake learning rate 5x the student's (``fake_lr_scale``) are
  the defaults; an optional ``fake_warmup`` (for an analytic teacher).

Sampling at ``nfe = K`` is the trained trajectory; other NFEs use ``nfe`` index levels (nested for divisors of
``K``), whose segments it was not trained on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.errors import ConfigError
from fewstep.methods.base import Phase
from fewstep.methods.distribution.matching import DistributionMatching, DistributionMatchingConfig
from fewstep.methods.scores import GRID_SIZE, karras_grid
from fewstep.models.denoiser import Denoiser
from fewstep.solvers import SIGMA_MAX, Sampling


@dataclass
class TDMConfig(DistributionMatchingConfig):
    generation_steps: int = 4
    fake_lr_scale: float = 5.0  # the code's: the student's learning rate is the fake score's / 5
    betas: tuple[float, float] = (0.0, 0.95)


def segment_bounds(steps: int, low: float, high: float) -> list[tuple[int, int]]:
    """Grid indices ``[start, stop)`` of each step's segment of the Karras grid (step ``k`` runs from index
    ``k * 1000 / steps`` to the next step's), cut to the part ``[low, high)`` of the grid."""
    lo, hi = round(low * GRID_SIZE), round(high * GRID_SIZE)
    edges = [k * GRID_SIZE // steps for k in range(steps)] + [GRID_SIZE]
    return [(max(a, lo), min(b, hi)) for a, b in itertools.pairwise(edges)]


class TDM(DistributionMatching):
    """TDM: a deterministic few-step student whose every step is matched in distribution within its segment."""

    name = "tdm"
    paper = "Luo et al. 2025, Learning Few-Step Diffusion Models by Trajectory Distribution Matching"
    needs = frozenset({"noise"})
    Config = TDMConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: TDMConfig):
        super().__init__(teacher, student, config)
        if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
            raise ConfigError(f"method_args.betas must be two numbers in [0, 1), got {config.betas}")
        self.bounds = segment_bounds(config.generation_steps, config.min_level, config.max_level)
        if any(start >= stop for start, stop in self.bounds):
            raise ConfigError(f"method_args: generation_steps {config.generation_steps} leaves a step no level in "
                              f"[min_level, max_level] = [{config.min_level}, {config.max_level}] of the grid")
        self.segment: Tensor | None = None  # per sample, the step that generated() last drew

    def phases(self) -> list[Phase]:
        betas = tuple(self.config.betas)
        return [Phase("fake_score", list(self.fake_score.parameters()), self.config.fake_updates,
                      self.config.fake_lr_scale, betas=betas),
                Phase("student", list(self.student.parameters()), betas=betas)]

    def generated(self, noise: Tensor, cond, generator: torch.Generator) -> Tensor:
        """``x0_k``: each sample's step ``k`` drawn uniformly, the student's deterministic trajectory run to it
        without gradient, then step ``k``'s prediction (with gradient when enabled). Records ``k`` in
        :attr:`segment` for the levels of the losses."""
        levels = self.generator_levels(self.config.generation_steps)
        step = torch.randint(len(levels), (noise.shape[0],), generator=generator, device=noise.device)
        x = levels[0] * noise
        start = x.clone()
        with torch.no_grad():
            for k in range(1, int(step.max()) + 1):
                sigma = torch.full((x.shape[0],), levels[k - 1], device=x.device, dtype=x.dtype)
                x0 = self.student(x, sigma, cond)
                x = x0 + (levels[k] / levels[k - 1]) * (x - x0)
                start = torch.where((step == k).reshape(-1, *([1] * (x.ndim - 1))), x, start)
        sigma = torch.tensor(levels, device=x.device, dtype=x.dtype)[step]
        self.segment = step
        return self.student(start, sigma, cond)

    def segment_levels(self, like: Tensor, generator: torch.Generator) -> Tensor:
        """Per sample, a level of its step's segment (:attr:`segment`), uniformly by grid index."""
        if self.segment is None:
            raise RuntimeError("segment_levels needs generated() first")
        bounds = torch.tensor(self.bounds, device=like.device)[self.segment]
        u = torch.rand(like.shape[0], generator=generator, device=like.device, dtype=torch.float64)
        index = bounds[:, 0] + (u * (bounds[:, 1] - bounds[:, 0])).long()
        scale = self.config.init_sigma / SIGMA_MAX
        return (karras_grid().to(like.device)[index] * scale).to(like.dtype)

    def critic_levels(self, x_generated: Tensor, generator: torch.Generator) -> Tensor:
        return self.segment_levels(x_generated, generator)

    def loss_levels(self, x_generated: Tensor, generator: torch.Generator) -> Tensor:
        return self.segment_levels(x_generated, generator)

    def sampling(self, nfe: int) -> Sampling:
        return Sampling("euler", [*self.generator_levels(nfe), 0.0])
