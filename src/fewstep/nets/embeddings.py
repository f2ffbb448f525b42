"""Time (noise-level) and class embeddings shared by the backbones."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fewstep.errors import ConfigError, DataError


def check_sizes(owner: str, dropout: float, **sizes: tuple[int, int]) -> None:
    """Refuse a size below its least value (``name=(value, least)``) or a dropout outside [0, 1), naming it."""
    for name, (value, least) in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{owner} {name} must be an integer >= {least}, got {value!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"{owner} dropout must be in [0, 1), got {dropout!r}")


class TimeEmbedding(nn.Module):
    """Sinusoidal features of a scalar time input followed by a two-layer MLP.

    Frequencies (radians per unit of input) are geometric between ``frequencies[0]`` and ``frequencies[1]``.
    The default ``(1e-3, 1e2)`` resolves both EDM's ``c_noise = log(s)/4`` (range about [-2, 1.1]) and integer
    DDPM timesteps (0..999). Continuous-time consistency models differentiate the network in its time input,
    and high frequencies make that derivative large and unstable (sCM, Lu & Song 2024, "no large Fourier
    scales"): their recipes train with a narrower range such as ``(0.1, 20)``."""

    def __init__(self, dim: int, features: int = 64, frequencies: tuple[float, float] = (1e-3, 1e2)):
        super().__init__()
        if len(frequencies) != 2 or not 0 < frequencies[0] <= frequencies[1]:
            raise ValueError(f"time_frequencies must be (low, high) with 0 < low <= high, got {tuple(frequencies)}")
        freqs = torch.exp(torch.linspace(math.log(frequencies[0]), math.log(frequencies[1]), features // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise.to(self.freqs.dtype).reshape(-1, 1) * self.freqs[None]
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


def extra_condition_embedding(dim: int) -> TimeEmbedding:
    """The embedding of one extra scalar input; its last layer starts at zero so adding it to a trained network
    leaves the network's outputs unchanged until it is trained."""
    embedding = TimeEmbedding(dim)
    nn.init.zeros_(embedding.mlp[-1].weight)
    nn.init.zeros_(embedding.mlp[-1].bias)
    return embedding


def condition_embedding(backbone: nn.Module, c_noise: Tensor, label: Tensor | None, extra: Tensor | None,
                        batch: int) -> Tensor:
    """``silu(time + class + extra scalars)``: the embedding a backbone modulates its blocks with. ``extra`` has
    shape ``(batch, len(backbone.extra_embeddings))`` (a second time for two-time maps, a guidance scale, ...)."""
    if label is not None and not isinstance(label, Tensor):
        raise DataError(f"{type(backbone).__name__} is conditioned on class labels, not on a "
                        f"{type(label).__name__}: use a backbone that reads text (a diffusers one)")
    emb = backbone.time_embedding(c_noise)
    if backbone.label_embedding is not None:
        emb = emb + backbone.label_embedding(label, batch, c_noise.device)
    count = len(backbone.extra_embeddings)
    if count and (extra is None or tuple(extra.shape) != (batch, count)):
        got = None if extra is None else tuple(extra.shape)
        raise ValueError(f"this backbone takes {count} extra condition(s): pass extra of shape ({batch}, {count}), "
                         f"got {got}")
    if not count and extra is not None:
        raise ValueError("this backbone takes no extra conditions (build it with extra_conditions=N)")
    for i, embedding in enumerate(backbone.extra_embeddings):
        emb = emb + embedding(extra[:, i])
    return nn.functional.silu(emb)


def add_extra_conditions(backbone: nn.Module, count: int) -> nn.Module:
    """Give ``backbone`` (in place) ``count`` more scalar inputs, zero-initialised so its outputs are unchanged
    until trained; ``hparams`` are updated so a saved copy rebuilds with them. Returns the backbone. A backbone
    without extra inputs (a diffusers model) is refused."""
    if not hasattr(backbone, "extra_embeddings"):
        raise ConfigError(f"this method gives its student {count} more scalar input(s) (a second time, a weight); a "
                          f"{type(backbone).__name__} takes none: use a fewstep backbone (mlp, unet) or another "
                          "method")
    device = next(backbone.parameters()).device
    for _ in range(count):
        backbone.extra_embeddings.append(extra_condition_embedding(backbone.hparams["emb_dim"]).to(device))
    backbone.hparams["extra_conditions"] = len(backbone.extra_embeddings)
    return backbone
