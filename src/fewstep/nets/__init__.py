"""Backbones made here. Each is ``F(x, c_noise, label) -> Tensor`` shaped like ``x``, with attributes
``data_shape``, ``num_classes`` and ``hparams`` (the keyword arguments that rebuild it)."""

from torch import nn

from fewstep.nets.mlp import MLP
from fewstep.nets.unet import SmallUNet

BACKBONES: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": SmallUNet}


def build_backbone(name: str, **hparams) -> nn.Module:
    """Build a backbone by name (``"mlp"`` or ``"unet"``) from its keyword arguments."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](**hparams)


__all__ = ["BACKBONES", "MLP", "SmallUNet", "build_backbone"]
