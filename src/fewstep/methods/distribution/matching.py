"""The distribution-matching family's base: a generator (one step, or a few with re-noising) and a fake score
trained on its samples, two phases per cycle. The shared math is :mod:`fewstep.methods.scores`; each method
(DMD, DMD2, Diff-Instruct, SwiftBrush, SiD, SIM, f-distill, Uni-Instruct, TDM) subclasses
:class:`DistributionMatching` in its own file and states its losses there.

Per cycle: ``fake_updates`` fake-score updates (:meth:`DistributionMatching.critic_losses`), then one generator
update (:meth:`DistributionMatching.dmd_loss` plus :meth:`DistributionMatching.extra_generator_losses`), idle
for the first ``fake_warmup`` steps. The fake score's and the distribution term's noise levels come from
:meth:`DistributionMatching.critic_levels` and :meth:`DistributionMatching.loss_levels`. The generator's levels
are :func:`~fewstep.methods.scores.index_levels` scaled to start at ``init_sigma``; with ``generation_steps > 1``
a level is drawn per update and reached by backward simulation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch, CompositeBatch
from fewstep.errors import ConfigError
from fewstep.methods.base import DistillationMethod, MethodConfig, Phase
from fewstep.methods.scores import (
    dmd_direction,
    fake_score_loss,
    generate,
    index_levels,
    karras_index_sigma,
    noised,
    pseudo_target_loss,
)
from fewstep.models.denoiser import Denoiser
from fewstep.solvers import SIGMA_MAX, Sampling


@dataclass
class DistributionMatchingConfig(MethodConfig):
    """What every generator trained against a fake score has."""

    fake_updates: int = 1
    fake_lr_scale: float = 1.0
    fake_warmup: int = 0
    generation_steps: int = 1
    init_sigma: float = SIGMA_MAX  # the generator's first level: it is fed init_sigma * z
    min_level: float = 0.02  # the generator loss's levels: this part [min_level, max_level] of the grid, by index
    max_level: float = 0.98



class DistributionMatching(DistillationMethod):
    """A generator trained against a fake score of its own samples: the family's two phases, generator levels,
    backward simulation and DMD's normalised gradient. Methods override :meth:`dmd_loss` (the generator's
    distribution term), :meth:`critic_losses` and :meth:`extra_generator_losses` (none here)."""

    family = "distribution"
    needs = frozenset({"noise"})
    Config = DistributionMatchingConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: DistributionMatchingConfig):
        super().__init__(teacher, student, config)
        if config.fake_updates < 1 or config.fake_lr_scale <= 0 or config.fake_warmup < 0:
            raise ConfigError("method_args: need fake_updates >= 1, fake_lr_scale > 0 and fake_warmup >= 0")
        if config.generation_steps < 1:
            raise ConfigError(f"method_args.generation_steps must be >= 1, got {config.generation_steps}")
        if not 0 <= config.min_level < config.max_level <= 1:
            raise ConfigError("method_args: need 0 <= min_level < max_level <= 1 (parts of the Karras grid)")
        if not 0 < config.init_sigma <= SIGMA_MAX:
            raise ConfigError(f"method_args.init_sigma must be in (0, {SIGMA_MAX}], got {config.init_sigma}")
        self.sigma_data = student.sigma_data
        self.fake_score = type(self).build_fake_score(teacher, config, lambda: copy.deepcopy(student.backbone),
                                                      student.sigma_data)

    @classmethod
    def build_fake_score(cls, teacher: Denoiser, config: DistributionMatchingConfig,
                         new_backbone: Callable[[], nn.Module], sigma_data: float) -> Denoiser:
        """The fake score a run starts from: built as the student is (a copy of the teacher's network, or
        ``new_backbone()`` for an analytic teacher)."""
        return cls.build_student(teacher, config, new_backbone, sigma_data)

    def phases(self) -> list[Phase]:
        return [Phase("fake_score", list(self.fake_score.parameters()), self.config.fake_updates,
                      self.config.fake_lr_scale), Phase("student", list(self.student.parameters()))]

    def generator_input(self, batch: Batch | CompositeBatch) -> Batch:
        """The part of the batch the generator draws from: its noise (and condition)."""
        return batch["noise"] if isinstance(batch, CompositeBatch) else batch

    def generator_levels(self, nfe: int) -> list[float]:
        """The generator's ``nfe`` levels: :func:`~fewstep.methods.scores.index_levels` scaled to start at
        ``init_sigma``."""
        return [level * self.config.init_sigma / SIGMA_MAX for level in index_levels(nfe)]

    def generated(self, noise: Tensor, cond, generator: torch.Generator) -> Tensor:
        """``x_G`` from ``noise``: one of the ``generation_steps`` levels drawn uniformly, reached by backward
        simulation (:func:`~fewstep.methods.scores.generate`)."""
        levels = self.generator_levels(self.config.generation_steps)
        k = int(torch.randint(len(levels), (1,), generator=generator, device=noise.device))
        return generate(self.student, noise, levels[:k + 1], cond, generator)

    def losses(self, phase: str, batch: Batch | CompositeBatch, step: int,
               generator: torch.Generator) -> dict[str, Tensor]:
        source = self.generator_input(batch)
        if phase == "fake_score":
            return self.critic_losses(batch, source, generator)
        if step < self.config.fake_warmup:
            return {"loss": torch.zeros((), device=source.noise.device)}  # idle: the fake score catches up first
        x_generated = self.generated(source.noise, source.cond, generator)
        dmd = self.dmd_loss(x_generated, source.cond, generator)
        extra = self.extra_generator_losses(batch, x_generated, source.cond, generator)
        return {"loss": dmd + sum(extra.values()), "dmd": dmd.detach(),
                **{name: value.detach() for name, value in extra.items()}}

    def critic_losses(self, batch: Batch | CompositeBatch, source: Batch,
                      generator: torch.Generator) -> dict[str, Tensor]:
        with torch.no_grad():
            x_generated = self.generated(source.noise, source.cond, generator)
        sigma = self.critic_levels(x_generated, generator)
        return {"loss": fake_score_loss(self.fake_score, x_generated, sigma, source.cond, generator, self.sigma_data)}

    def critic_levels(self, x_generated: Tensor, generator: torch.Generator) -> Tensor:
        """The fake score's levels on ``x_generated``: the whole Karras grid, uniformly by index."""
        return karras_index_sigma(x_generated.shape[0], generator, x_generated)

    def loss_levels(self, x_generated: Tensor, generator: torch.Generator) -> Tensor:
        """The generator loss's levels on ``x_generated``: the part ``[min_level, max_level]`` of the Karras grid,
        uniformly by index."""
        return karras_index_sigma(x_generated.shape[0], generator, x_generated, self.config.min_level,
                                  self.config.max_level)

    def dmd_loss(self, x_generated: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = self.loss_levels(x_generated, generator)
        with torch.no_grad():
            x = noised(x_generated, sigma, generator)
            direction = dmd_direction(x_generated, self.teacher(x, sigma, cond), self.fake_score(x, sigma, cond))
        return pseudo_target_loss(x_generated, direction)

    def extra_generator_losses(self, batch: Batch | CompositeBatch, x_generated: Tensor, cond,
                               generator: torch.Generator) -> dict[str, Tensor]:
        """Generator terms beside the distribution term (DMD's regression, DMD2's GAN term): none here."""
        return {}

    def sampling(self, nfe: int) -> Sampling:
        return Sampling("consistency", self.generator_levels(nfe))
