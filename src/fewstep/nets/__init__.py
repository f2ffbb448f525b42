"""Backbones made here. Each is ``F(x, c_noise, label=None, extra=None) -> Tensor`` shaped like ``x``, with
attributes ``data_shape``, ``num_classes`` and ``hparams`` (the keyword arguments that rebuild it). ``extra`` holds
``extra_conditions`` further scalar inputs per sample, shape ``(B, extra_conditions)``: see
:func:`~fewstep.nets.embeddings.add_extra_conditions`."""

from torch import nn

from fewstep.nets.diffusers_backbone import DiffusersBackbone
from fewstep.nets.embeddings import add_extra_conditions
from fewstep.nets.mlp import MLP
from fewstep.nets.unet import SmallUNet

BACKBONES: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": SmallUNet, "diffusers": DiffusersBackbone}


def build_backbone(name: str, **hparams) -> nn.Module:
    """Build a backbone by name (``"mlp"``, ``"unet"`` or ``"diffusers"``) from its keyword arguments."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](**hparams)


__all__ = ["BACKBONES", "MLP", "DiffusersBackbone", "SmallUNet", "add_extra_conditions", "build_backbone"]
