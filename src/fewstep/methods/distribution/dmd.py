"""DMD: Distribution Matching Distillation. Yin, Gharbi, Zhang, Shechtman, Durand, Freeman & Park, "One-step
Diffusion with Distribution Matching Distillation", CVPR 2024.

A one-step generator ``G_theta(z) = D_theta(sigma_max z, sigma_max)`` (the teacher's network, EDM-preconditioned)
is trained so that its output distribution matches the teacher's at every noise level. Two phases per cycle
(shared math in :mod:`fewstep.methods.scores`):

**Fake score** (``fake_updates`` updates): ``D_fake`` (a copy of the teacher's network; of the student's for an
analytic teacher) learns the generator's current distribution::

    x_G = sg G_theta(z),   sigma ~ Karras grid (all of it)
    L_fake = lambda(sigma) mean_D || D_fake(x_G + sigma eps, sigma) - x_G ||^2

**Generator** (one update): the distribution-matching gradient plus a regression onto cached teacher pairs::

    x_G = G_theta(z),   x = x_G + sigma eps,   sigma ~ Karras grid [0.02, 0.98] by index
    g   = (D_fake(x, sigma) - D_real(x, sigma)) / mean_D |x_G - D_real(x, sigma)|        (no gradient)
    L   = 1/2 mean_D || x_G - sg(x_G - g) ||^2  +  reg_weight mean_D || G_theta(z_ref) - y_ref ||^2

``(z_ref, y_ref)``: noise and the teacher's ODE endpoint from it (``teacher_pairs``, solved once and cached; their
cost is charged to the run). ``D_real`` is the teacher with its guidance, ``D_fake`` is never guided. The
regression term anchors the generator to the teacher's noise-to-sample map, which keeps the reverse-KL gradient
from collapsing modes. With ``generation_steps > 1`` the generator is trained on that many levels
(:func:`~fewstep.methods.scores.index_levels`) by backward simulation, as DMD2 does; the paper's generator has one.
``init_sigma`` moves the generator's level below the top (the whole schedule scaled to start there), as
Diff-Instruct and SiD feed ``init_sigma z``.

Deviations from the paper: the regression distance is the mean squared error (LPIPS is not offered, as for CD);
the generator runs at the Karras grid's top level rather than DDPM's timestep 999; a ``fake_warmup`` of steps in
which only the fake score learns (for an analytic teacher, whose fake score starts from a random network).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.data.batch import Batch, CompositeBatch
from fewstep.errors import ConfigError
from fewstep.methods.base import DistillationMethod, MethodConfig, PairRequest, Phase
from fewstep.methods.losses import squared_l2
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
from fewstep.solvers import DEFAULT_TEACHER_NFE, SIGMA_MAX, Sampling


@dataclass
class DistributionMatchingConfig(MethodConfig):
    """What every generator trained against a fake score has (DMD, DMD2, Diff-Instruct)."""

    fake_updates: int = 1
    fake_lr_scale: float = 1.0
    fake_warmup: int = 0
    generation_steps: int = 1
    init_sigma: float = SIGMA_MAX  # the generator's first level: it is fed init_sigma * z
    min_level: float = 0.02  # the generator loss's levels: this part [min_level, max_level] of the grid, by index
    max_level: float = 0.98


@dataclass
class DMDConfig(DistributionMatchingConfig):
    reg_weight: float = 0.25
    num_pairs: int = 10000
    pair_solver: str = "heun"
    pair_nfe: int = DEFAULT_TEACHER_NFE


class DMD(DistillationMethod):
    """DMD: a one-step generator trained by a fake-score KL gradient and a regression onto teacher pairs."""

    name = "dmd"
    family = "distribution"
    paper = "Yin et al. 2024, One-step Diffusion with Distribution Matching Distillation"
    needs = frozenset({"noise", "teacher_pairs"})
    Config = DMDConfig

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
        if isinstance(config, DMDConfig) and (config.reg_weight < 0 or config.num_pairs < 1):
            raise ConfigError("method_args: need reg_weight >= 0 and num_pairs >= 1")
        if isinstance(config, DMDConfig) and config.reg_weight > 0 and config.init_sigma != SIGMA_MAX:
            raise ConfigError("method_args.init_sigma: DMD's regression pairs start from the teacher's top level "
                              f"{SIGMA_MAX}; leave init_sigma there or set reg_weight to 0")
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

    def pair_request(self) -> PairRequest:
        return PairRequest(self.config.num_pairs, self.config.pair_solver, self.config.pair_nfe)

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
        sigma = karras_index_sigma(x_generated.shape[0], generator, x_generated)
        return {"loss": fake_score_loss(self.fake_score, x_generated, sigma, source.cond, generator, self.sigma_data)}

    def dmd_loss(self, x_generated: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = karras_index_sigma(x_generated.shape[0], generator, x_generated, self.config.min_level,
                                   self.config.max_level)
        with torch.no_grad():
            x = noised(x_generated, sigma, generator)
            direction = dmd_direction(x_generated, self.teacher(x, sigma, cond), self.fake_score(x, sigma, cond))
        return pseudo_target_loss(x_generated, direction)

    def extra_generator_losses(self, batch: CompositeBatch, x_generated: Tensor, cond,
                               generator: torch.Generator) -> dict[str, Tensor]:
        """DMD's regression onto teacher pairs: ``reg_weight mean_D || G(z_ref) - y_ref ||^2``."""
        if self.config.reg_weight == 0:
            return {}
        pairs = batch["teacher_pairs"]
        prediction = generate(self.student, pairs.noise, self.generator_levels(1), pairs.cond, generator)
        return {"regression": self.config.reg_weight * squared_l2(prediction, pairs.endpoint).mean()}

    def sampling(self, nfe: int) -> Sampling:
        return Sampling("consistency", self.generator_levels(nfe))
