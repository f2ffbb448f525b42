"""Time (noise-level) and class embeddings shared by the backbones."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TimeEmbedding(nn.Module):
    """Sinusoidal features of a scalar time input followed by a two-layer MLP.

    Frequencies are geometric between ``1e-3`` and ``1e2`` so that both EDM's ``c_noise = log(s)/4``
    (range about [-2, 1.1]) and integer DDPM timesteps (0..999) are resolved."""

    def __init__(self, dim: int, features: int = 64):
        super().__init__()
        freqs = torch.exp(torch.linspace(math.log(1e-3), math.log(1e2), features // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise.float().reshape(-1, 1) * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))


class LabelEmbedding(nn.Module):
    """Class embedding with one extra row, index ``num_classes``, for "no label" (CFG's null condition)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, label: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if label is None:
            label = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.table(label.long())
