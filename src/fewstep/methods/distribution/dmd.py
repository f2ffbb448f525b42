"""DMD: Distribution Matching Distillation. Yin, Gharbi, Zhang, Shechtman, Durand, Freeman & Park, "One-step
Diffusion with Distribution Matching Distillation", CVPR 2024.

A one-step generator ``G_theta(z) = D_theta(sigma_max z, sigma_max)`` (the teacher's network, EDM-preconditioned)
is trained so that its output distribution matches the teacher's at every noise level. Two phases per cycle
(the family's base :mod:`fewstep.methods.distribution.matching`, its math :mod:`fewstep.methods.scores`):

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

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.data.batch import CompositeBatch
from fewstep.errors import ConfigError
from fewstep.methods.base import PairRequest
from fewstep.methods.distribution.matching import DistributionMatching, DistributionMatchingConfig
from fewstep.methods.losses import squared_l2
from fewstep.methods.scores import generate
from fewstep.models.denoiser import Denoiser, start_level
from fewstep.solvers import DEFAULT_TEACHER_NFE


@dataclass
class DMDConfig(DistributionMatchingConfig):
    reg_weight: float = 0.25
    num_pairs: int = 10000
    pair_solver: str = "heun"
    pair_nfe: int = DEFAULT_TEACHER_NFE


class DMD(DistributionMatching):
    """DMD: a one-step generator trained by a fake-score KL gradient and a regression onto teacher pairs."""

    name = "dmd"
    paper = "Yin et al. 2024, One-step Diffusion with Distribution Matching Distillation"
    needs = frozenset({"noise", "teacher_pairs"})
    Config = DMDConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: DMDConfig):
        super().__init__(teacher, student, config)
        if config.reg_weight < 0 or config.num_pairs < 1:
            raise ConfigError("method_args: need reg_weight >= 0 and num_pairs >= 1")
        top = start_level(teacher)
        if config.reg_weight > 0 and config.init_sigma != top:
            raise ConfigError(f"method_args.init_sigma: DMD's regression pairs start from the teacher's top level "
                              f"{top:g}; leave init_sigma there or set reg_weight to 0")

    def pair_request(self) -> PairRequest:
        return PairRequest(self.config.num_pairs, self.config.pair_solver, self.config.pair_nfe)

    def extra_generator_losses(self, batch: CompositeBatch, x_generated: Tensor, cond,
                               generator: torch.Generator) -> dict[str, Tensor]:
        """DMD's regression onto teacher pairs: ``reg_weight mean_D || G(z_ref) - y_ref ||^2``."""
        if self.config.reg_weight == 0:
            return {}
        pairs = batch["teacher_pairs"]
        prediction = generate(self.student, pairs.noise, self.generator_levels(1), pairs.cond, generator)
        return {"regression": self.config.reg_weight * squared_l2(prediction, pairs.endpoint).mean()}
