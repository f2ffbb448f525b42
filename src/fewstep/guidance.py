"""Classifier-free guidance, with its convention written down.

Two conventions exist in the literature for the same idea; fewstep names both and never guesses:

* ``"cfg"`` (Ho & Salimans; diffusers' ``guidance_scale``): ``x0 = uncond + w (cond - uncond)``;
  ``w = 1`` is the plain conditional model, ``w = 0`` the unconditional one.
* ``"cfg_plus_one"`` (Ho & Salimans' paper, DMD2's code): ``x0 = cond + w (cond - uncond)``, i.e. the
  ``"cfg"`` form at ``w + 1``; ``w = 0`` is the plain conditional model.

Guidance is applied to the x0-prediction, which is linear in the other predictions at fixed ``(x, s)``,
so the result is the same as guiding eps, v or the velocity. The unconditional output is the model's at the
null condition: the index ``num_classes`` for class labels, the encoding of the empty prompt for text.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep import conditions
from fewstep.conditions import Condition, TextCondition
from fewstep.models.denoiser import Denoiser, DenoiserWrapper, as_sigma

CONVENTIONS = ("cfg", "cfg_plus_one")


def cfg_weight(scale: float, convention: str) -> float:
    """The weight ``w`` of the ``"cfg"`` form that ``scale`` means under ``convention``."""
    if convention == "cfg":
        return scale
    if convention == "cfg_plus_one":
        return scale + 1.0
    raise ValueError(f"unknown guidance convention {convention!r}; choose one of {CONVENTIONS}")


class GuidedDenoiser(DenoiserWrapper):
    """A conditional denoiser with classifier-free guidance at a fixed scale, or at per-sample weights given
    with a call (``weight``, ``(B,)``, in the ``"cfg"`` form).

    Calls without a condition, and calls at weight 1, are the plain denoiser (one evaluation), and so are calls of
    a denoiser without classes on a label tensor. ``null`` is the null condition for text (a one-row
    :class:`~fewstep.conditions.TextCondition`), without which text cannot be guided; class labels use the index
    ``num_classes``."""

    def __init__(self, denoiser: Denoiser, scale: float = 1.0, convention: str = "cfg",
                 null: TextCondition | None = None):
        super().__init__(denoiser)
        self.null, self.scale, self.convention = null, scale, convention
        self.weight = cfg_weight(scale, convention)

    def config(self) -> dict:
        return {"kind": "guided", "weight": self.weight, "null": self.null is not None}

    def null_condition(self, cond: Condition) -> Condition:
        """The null condition for each row of ``cond``."""
        if isinstance(cond, TextCondition):
            if self.null is None:
                raise ValueError("guiding a text-conditioned denoiser needs its null condition (the empty prompt)")
            return self.null.to(cond.embeddings.device).expand(len(cond))
        return torch.full_like(cond, self.num_classes)

    def forward(self, x: Tensor, s: Tensor, cond: Condition | None = None, weight: Tensor | None = None) -> Tensor:
        s = as_sigma(s, x)
        unguided = weight is None and self.weight == 1.0
        if unguided or cond is None or (isinstance(cond, Tensor) and self.num_classes == 0):
            return self.denoiser(x, s, cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([s, s]), conditions.cat(cond, self.null_condition(cond)))
        guided, unguided = both.chunk(2)
        w = self.weight if weight is None else weight.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return unguided + w * (guided - unguided)
