"""Residual MLP backbone for vector data (2-D toys, flattened digits)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from fewstep.nets.embeddings import (
    LabelEmbedding,
    TimeEmbedding,
    check_sizes,
    condition_embedding,
    extra_condition_embedding,
)


class ResidualBlock(nn.Module):
    """``h + W2 silu(W1 norm(h) * (1 + scale) + shift)`` with ``(scale, shift)`` from the embedding."""

    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.modulation = nn.Linear(emb_dim, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.modulation(emb).chunk(2, dim=1)
        u = self.fc1(self.norm(h)) * (1 + scale) + shift
        return h + self.fc2(self.dropout(nn.functional.silu(u)))


class MLP(nn.Module):
    """``F(x, c_noise, cond)`` (``cond``: class labels or None) for samples of any shape, flattened internally."""

    def __init__(self, data_shape: tuple[int, ...], width: int = 256, depth: int = 4, emb_dim: int = 128,
                 num_classes: int = 0, dropout: float = 0.0, extra_conditions: int = 0,
                 time_frequencies: tuple[float, float] = (1e-3, 1e2)):
        super().__init__()
        check_sizes("MLP", dropout, width=(width, 1), emb_dim=(emb_dim, 1), depth=(depth, 0),
                    num_classes=(num_classes, 0), extra_conditions=(extra_conditions, 0))
        self.data_shape, self.num_classes = tuple(data_shape), num_classes
        self.hparams = {"data_shape": list(data_shape), "width": width, "depth": depth, "emb_dim": emb_dim,
                        "num_classes": num_classes, "dropout": dropout,
                        "extra_conditions": extra_conditions, "time_frequencies": list(time_frequencies)}
        dim = math.prod(self.data_shape)
        self.time_embedding = TimeEmbedding(emb_dim, frequencies=tuple(time_frequencies))
        self.label_embedding = LabelEmbedding(num_classes, emb_dim) if num_classes else None
        self.extra_embeddings = nn.ModuleList(extra_condition_embedding(emb_dim) for _ in range(extra_conditions))
        self.input = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, emb_dim, dropout) for _ in range(depth))
        self.output = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
        emb = condition_embedding(self, c_noise, cond, extra, x.shape[0])
        h = self.input(x.reshape(x.shape[0], -1).to(self.input.weight.dtype))
        for block in self.blocks:
            h = block(h, emb)
        return self.output(h).reshape(x.shape)
