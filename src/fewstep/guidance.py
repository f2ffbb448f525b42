"""Classifier-free guidance, with its convention written down.

Two conventions exist in the literature for the same idea; fewstep names both and never guesses:

* ``"cfg"`` (Ho & Salimans; diffusers' ``guidance_scale``): ``x0 = uncond + w (cond - uncond)``;
  ``w = 1`` is the plain conditional model, ``w = 0`` the unconditional one.
* ``"cfg_plus_one"`` (Ho & Salimans' paper, DMD2's code): ``x0 = cond + w (cond - uncond)``, i.e. the
  ``"cfg"`` form at ``w + 1``; ``w = 0`` is the plain conditional model.

Guidance is applied to the x0-prediction, which is linear in the other predictions at fixed ``(x, s)``,
so the result is the same as guiding eps, v or the velocity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.models.denoiser import Denoiser, as_sigma

CONVENTIONS = ("cfg", "cfg_plus_one")


def cfg_weight(scale: float, convention: str) -> float:
    """The weight ``w`` of the ``"cfg"`` form that ``scale`` means under ``convention``."""
    if convention == "cfg":
        return scale
    if convention == "cfg_plus_one":
        return scale + 1.0
    raise ValueError(f"unknown guidance convention {convention!r}; choose one of {CONVENTIONS}")


class GuidedDenoiser(Denoiser):
    """Wrap a class-conditional denoiser with classifier-free guidance at a fixed scale.

    Calls without a label are passed through unguided (unconditional)."""

    def __init__(self, denoiser: Denoiser, scale: float, convention: str = "cfg"):
        super().__init__()
        if denoiser.num_classes == 0:
            raise ValueError("guidance needs a class-conditional denoiser (num_classes > 0)")
        self.denoiser = denoiser
        self.scale, self.convention = scale, convention
        self.weight = cfg_weight(scale, convention)
        self.data_shape, self.num_classes = denoiser.data_shape, denoiser.num_classes

    def forward(self, x: Tensor, s: Tensor, label: Tensor | None = None) -> Tensor:
        s = as_sigma(s, x)
        if label is None or self.weight == 1.0:
            return self.denoiser(x, s, label)
        null = torch.full_like(label, self.num_classes)
        both = self.denoiser(torch.cat([x, x]), torch.cat([s, s]), torch.cat([label, null]))
        cond, uncond = both.chunk(2)
        return uncond + self.weight * (cond - uncond)
