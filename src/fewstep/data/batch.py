"""What a training step consumes: the kinds of training signal (:data:`NEEDS`) and the batches that carry them.

A method declares the set of kinds it needs. A source of one kind fills a :class:`Batch`; a method that needs
several kinds (noise for its generator and real data for a discriminator, say) gets a :class:`CompositeBatch`,
one :class:`Batch` per kind, drawn together. Every batch carries its condition (:mod:`fewstep.conditions`):
class labels, text-encoder output, or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fewstep.conditions import Condition

NEEDS = {
    "data": "real training samples x0 (with their condition when conditional)",
    "teacher_pairs": "(noise, endpoint) pairs of a denoiser's ODE solved with a named solver, cached on disk",
    "noise": "nothing but Gaussian noise (and a condition when conditional): data-free",
    "labels": "class labels only, with noise (data-free, conditional)",
}


@dataclass
class Batch:
    """One batch of one kind: which fields are set depends on the kind (``data``: ``x0``; ``noise``: ``noise``;
    ``teacher_pairs``: ``noise`` and ``endpoint``), and ``cond`` is set when the data are conditional."""

    x0: Tensor | None = None
    cond: Condition | None = None
    noise: Tensor | None = None
    endpoint: Tensor | None = None

    def _values(self) -> tuple:
        return self.x0, self.cond, self.noise, self.endpoint

    @property
    def size(self) -> int:
        for value in (self.x0, self.noise, self.endpoint, self.cond):
            if value is not None:
                return len(value)
        raise ValueError("empty batch")

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if v is None else v.to(device) for v in self._values()))

    def rows(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` of every field (a process's slice, a micro-batch)."""
        return Batch(*(None if v is None else v[start:stop] for v in self._values()))


@dataclass
class CompositeBatch:
    """One :class:`Batch` per kind of training signal, all of the same size: ``batch["noise"]``,
    ``batch["data"]``."""

    parts: dict[str, Batch] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> Batch:
        if kind not in self.parts:
            raise KeyError(f"this batch carries {sorted(self.parts)}, not {kind!r}")
        return self.parts[kind]

    @property
    def size(self) -> int:
        return next(iter(self.parts.values())).size

    def to(self, device: torch.device | str) -> CompositeBatch:
        return CompositeBatch({kind: part.to(device) for kind, part in self.parts.items()})

    def rows(self, start: int, stop: int) -> CompositeBatch:
        return CompositeBatch({kind: part.rows(start, stop) for kind, part in self.parts.items()})
