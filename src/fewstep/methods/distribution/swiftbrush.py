"""SwiftBrush: Nguyen & Tran, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
Distillation", CVPR 2024 (code VinAIResearch/SwiftBrush).

Image-free variational score distillation (VSD): a one-step generator ``G_theta(z) = D_theta(sigma_max z, sigma_max)``
(the teacher's network) learns from the teacher and a *LoRA teacher*, the teacher's network plus a low-rank
adapter trained on the generator's samples, with prompts (here: labels, or nothing) and noise only: no real
sample is ever read (``needs = {noise}``; a conditional dataset's noise batch carries random labels)::

    LoRA teacher:  L_lora = lambda(sigma) mean_D || D_lora(sg x_G + sigma eps, sigma) - sg x_G ||^2,
                   sigma ~ the whole Karras grid, only the adapter's weights train
    generator:     x = x_G + sigma eps,   sigma ~ Karras grid [0.02, 0.98] by index
                   g = w(sigma) (D_lora(x, sigma) - D_real(x, sigma)),   w(sigma) = sigma / (1 + sigma^2)
                   L_G = 1/2 mean_D || x_G - sg(x_G - g) ||^2

``w`` is the paper's VP weight ``sigma_t^2 (eps_teacher - eps_lora)`` written on fewstep's VE levels
(``sigma_t^2 = sigma^2 / (1 + sigma^2)``, ``eps = (x - D) / sigma``): no DMD normalisation. The LoRA (rank
``lora_rank``, alpha ``lora_alpha``, every linear layer) is added with peft to a copy of the teacher's network; the
teacher itself is never changed. An analytic teacher has no network, so its LoRA teacher is a whole network (a copy
of the student's) trained in full.

Deviations from the paper: guidance is on the teacher only (fewstep's rule for the family), the paper applies the
same scale to the LoRA teacher too; the LoRA teacher's loss is EDM's x0 loss with its weight, not an
``alpha_bar``-weighted eps loss; one LoRA update then one generator update per cycle (the paper: the other order,
on the same sample); ``fake_warmup`` steps for an analytic teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.errors import ConfigError
from fewstep.methods.base import Phase, teacher_backbone_copy
from fewstep.methods.distribution.matching import DistributionMatching, DistributionMatchingConfig
from fewstep.methods.scores import karras_index_sigma, noised, pseudo_target_loss
from fewstep.models.denoiser import Denoiser, EDMDenoiser
from fewstep.paths import bcast


@dataclass
class SwiftBrushConfig(DistributionMatchingConfig):
    lora_rank: int = 64
    lora_alpha: float = 108.0


def with_lora(backbone: nn.Module, rank: int, alpha: float) -> nn.Module:
    """``backbone`` with a peft LoRA adapter on every linear layer; only the adapter's weights train."""
    from peft import LoraConfig, inject_adapter_in_model

    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear"), backbone)


class SwiftBrush(DistributionMatching):
    """SwiftBrush: image-free VSD of a one-step generator against a LoRA teacher."""

    name = "swiftbrush"
    paper = "Nguyen & Tran 2024, SwiftBrush (one-step VSD)"
    needs = frozenset({"noise"})
    Config = SwiftBrushConfig

    def __init__(self, teacher: Denoiser, student: Denoiser, config: SwiftBrushConfig):
        if config.lora_rank < 1 or config.lora_alpha <= 0:
            raise ConfigError("method_args: need lora_rank >= 1 and lora_alpha > 0")
        super().__init__(teacher, student, config)

    @classmethod
    def build_fake_score(cls, teacher: Denoiser, config: SwiftBrushConfig, new_backbone: Callable[[], nn.Module],
                         sigma_data: float) -> Denoiser:
        """The LoRA teacher: the teacher's network (copied) with an adapter, or a whole new network for an
        analytic teacher."""
        backbone = teacher_backbone_copy(teacher)
        if backbone is None:
            return EDMDenoiser(new_backbone(), sigma_data)
        return EDMDenoiser(with_lora(backbone, config.lora_rank, config.lora_alpha), sigma_data)

    def phases(self) -> list[Phase]:
        trained = [p for p in self.fake_score.parameters() if p.requires_grad]
        return [Phase("fake_score", trained, self.config.fake_updates, self.config.fake_lr_scale),
                Phase("student", list(self.student.parameters()))]

    def dmd_loss(self, x_generated: Tensor, cond, generator: torch.Generator) -> Tensor:
        sigma = karras_index_sigma(x_generated.shape[0], generator, x_generated, self.config.min_level,
                                   self.config.max_level)
        with torch.no_grad():
            x = noised(x_generated, sigma, generator)
            difference = self.fake_score(x, sigma, cond) - self.teacher(x, sigma, cond)
            direction = bcast(sigma / (1 + sigma**2), difference) * difference
        return pseudo_target_loss(x_generated, direction)

