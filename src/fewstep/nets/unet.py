"""A small UNet for low-resolution images (digits at 1x8x8): two resolutions, scale-shift time conditioning."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.nets.embeddings import (
    LabelEmbedding,
    TimeEmbedding,
    check_sizes,
    condition_embedding,
    extra_condition_embedding,
)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ConvBlock(nn.Module):
    """Residual block: ``x + conv(silu(norm(conv(silu(norm(x)))) * (1 + scale) + shift))``."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.modulation = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.modulation(emb)[:, :, None, None].chunk(2, dim=1)
        h = nn.functional.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class SmallUNet(nn.Module):
    """``F(x, c_noise, cond)`` (``cond``: class labels or None) for images ``(C, H, W)`` with even ``H, W``: one
    down/up level, skip concat."""

    def __init__(self, data_shape: tuple[int, int, int], channels: int = 64, emb_dim: int = 128,
                 num_classes: int = 0, dropout: float = 0.0, extra_conditions: int = 0,
                 time_frequencies: tuple[float, float] = (1e-3, 1e2)):
        super().__init__()
        if len(data_shape) != 3 or data_shape[1] % 2 or data_shape[2] % 2:
            raise ValueError(f"SmallUNet needs (C, H, W) with even H and W, got {tuple(data_shape)}")
        check_sizes("SmallUNet", dropout, channels=(channels, 1), emb_dim=(emb_dim, 1), num_classes=(num_classes, 0),
                    extra_conditions=(extra_conditions, 0))
        self.data_shape, self.num_classes = tuple(data_shape), num_classes
        self.hparams = {"data_shape": list(data_shape), "channels": channels, "emb_dim": emb_dim,
                        "num_classes": num_classes, "dropout": dropout,
                        "extra_conditions": extra_conditions, "time_frequencies": list(time_frequencies)}
        c, c2 = channels, 2 * channels
        self.time_embedding = TimeEmbedding(emb_dim, frequencies=tuple(time_frequencies))
        self.label_embedding = LabelEmbedding(num_classes, emb_dim) if num_classes else None
        self.extra_embeddings = nn.ModuleList(extra_condition_embedding(emb_dim) for _ in range(extra_conditions))
        self.input = nn.Conv2d(data_shape[0], c, 3, padding=1)
        self.down1 = ConvBlock(c, c, emb_dim, dropout)
        self.downsample = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.mid1, self.mid2 = ConvBlock(c, c2, emb_dim, dropout), ConvBlock(c2, c2, emb_dim, dropout)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = ConvBlock(c2 + c, c, emb_dim, dropout)
        self.output = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, data_shape[0], 3, padding=1))

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
        emb = condition_embedding(self, c_noise, cond, extra, x.shape[0])
        h = self.down1(self.input(x.to(self.input.weight.dtype)), emb)
        m = self.mid2(self.mid1(self.downsample(h), emb), emb)
        u = self.up1(torch.cat([self.upsample(m), h], dim=1), emb)
        return self.output(u)
