"""Conditions: what a batch is conditioned on, passed unchanged from a data source through methods, samplers and
denoisers to the network.

A condition is one of

* a class-label tensor ``(B,)`` of integers in ``[0, num_classes)``, where the index ``num_classes`` is the null
  ("no label") condition of classifier-free guidance;
* a :class:`TextCondition`: a text encoder's output for ``B`` prompts (per-token embeddings, their attention
  mask, and a pooled vector for the models that take one), whose null condition is the encoding of the empty
  or negative prompt;
* ``None``: unconditional.

Both kinds answer ``cond[index]`` (rows), ``cond.to(device)`` and ``len(cond)``; :func:`cat` joins two of the
same kind along the batch. Nothing else in fewstep looks inside a condition except the network that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TextCondition:
    """Text-encoder output for a batch of ``B`` prompts: ``embeddings`` ``(B, tokens, dim)``, an attention
    ``mask`` ``(B, tokens)`` (or None: every token counts) and a ``pooled`` vector ``(B, dim_pooled)`` (or None;
    SDXL, SD3 and FLUX take one). A single row (``B = 1``) expands to any batch with :meth:`expand`."""

    embeddings: Tensor
    mask: Tensor | None = None
    pooled: Tensor | None = None

    def __post_init__(self):
        batch = self.embeddings.shape[0]
        for name in ("mask", "pooled"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != batch:
                raise ValueError(f"TextCondition.{name} has {value.shape[0]} rows but the embeddings have {batch}")

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, index) -> TextCondition:
        return TextCondition(*(None if v is None else v[index] for v in (self.embeddings, self.mask, self.pooled)))

    def to(self, *args, **kwargs) -> TextCondition:
        return TextCondition(*(None if v is None else v.to(*args, **kwargs)
                               for v in (self.embeddings, self.mask, self.pooled)))

    def expand(self, batch: int) -> TextCondition:
        """This one-row condition repeated for ``batch`` samples (views, no copy)."""
        if len(self) != 1:
            raise ValueError(f"only a one-row TextCondition expands; this one has {len(self)} rows")
        return TextCondition(*(None if v is None else v.expand(batch, *v.shape[1:])
                               for v in (self.embeddings, self.mask, self.pooled)))


Condition = Tensor | TextCondition


def cat(first: Condition, second: Condition) -> Condition:
    """Two conditions of the same kind joined along the batch (``first`` rows, then ``second`` rows)."""
    if isinstance(first, TextCondition) and isinstance(second, TextCondition):
        if (first.mask is None) != (second.mask is None) or (first.pooled is None) != (second.pooled is None):
            raise ValueError("cannot join text conditions with and without a mask or pooled vector")
        return TextCondition(*(None if a is None else torch.cat([a, b.to(a.dtype)])
                               for a, b in ((first.embeddings, second.embeddings), (first.mask, second.mask),
                                            (first.pooled, second.pooled))))
    if isinstance(first, Tensor) and isinstance(second, Tensor):
        return torch.cat([first, second])
    raise TypeError(f"cannot join a {type(first).__name__} condition with a {type(second).__name__} one")
