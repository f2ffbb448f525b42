"""Named intermediate features of a backbone, read through forward hooks (for discriminator heads and
feature-space losses).

The network still runs through its own ``forward`` (so FSDP units, gradient checkpointing and teacher autocast
keep working); hooks only record what chosen submodules return::

    with capture_features(student) as features:      # default points: feature_points(student)
        out = student(x, s)
    logits = head(pooled(features))                  # (B, sum of channels), still on the autograd graph

Names are dotted submodule names (``named_modules``) relative to the backbone: ``"blocks.0"`` for an
:class:`~fewstep.nets.MLP`, ``"model.mid_block"`` for a :class:`~fewstep.nets.DiffusersBackbone`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn

from fewstep.nets.diffusers_backbone import MODEL_CLASSES, DiffusersBackbone
from fewstep.nets.mlp import MLP
from fewstep.nets.unet import SmallUNet

# diffusers blocks that return ``(encoder_hidden_states, hidden_states)``: the image tokens come second (SD3's
# last joint block returns ``(None, hidden_states)``).
ENCODER_FIRST_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")
SUPPORTED = f"MLP, SmallUNet, DiffusersBackbone or a diffusers model ({', '.join(MODEL_CLASSES)})"


def _is_diffusers_model(module: nn.Module) -> bool:
    return any(cls.__name__ in MODEL_CLASSES for cls in type(module).__mro__)


def resolve_backbone(module: nn.Module) -> nn.Module:
    """The backbone inside ``module``: ``module`` itself if it is a known backbone (MLP, SmallUNet,
    DiffusersBackbone, a diffusers model), else its ``.backbone`` (followed through wrappers such as a denoiser
    around a denoiser), else ``module`` itself."""
    seen = set()
    while id(module) not in seen:
        seen.add(id(module))
        if isinstance(module, MLP | SmallUNet | DiffusersBackbone) or _is_diffusers_model(module):
            return module
        inner = getattr(module, "backbone", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner
    return module


def _diffusers_points(model: nn.Module, prefix: str) -> list[str]:
    if hasattr(model, "down_blocks"):  # UNet2DModel, UNet2DConditionModel
        names = [f"{prefix}down_blocks.{i}" for i in range(len(model.down_blocks))]
        names += [f"{prefix}mid_block"] if getattr(model, "mid_block", None) is not None else []
        return names + [f"{prefix}up_blocks.{i}" for i in range(len(model.up_blocks))]
    names = []
    for attribute in ("transformer_blocks", "single_transformer_blocks"):  # DiT, SD3, Sana; FLUX has both
        blocks = getattr(model, attribute, None)
        names += [f"{prefix}{attribute}.{i}" for i in range(len(blocks))] if blocks is not None else []
    return names


def feature_points(backbone: nn.Module) -> list[str]:
    """The default feature points of a backbone, as dotted submodule names relative to it:

    * :class:`~fewstep.nets.MLP`: each residual block, ``"blocks.0"``, ``"blocks.1"``, ...;
    * :class:`~fewstep.nets.SmallUNet`: ``"down1"``, ``"mid1"``, ``"mid2"``, ``"up1"``;
    * :class:`~fewstep.nets.DiffusersBackbone`: a UNet's ``"model.down_blocks.i"``, ``"model.mid_block"``,
      ``"model.up_blocks.i"``; a transformer's ``"model.transformer_blocks.i"`` (and FLUX's
      ``"model.single_transformer_blocks.i"``); a bare diffusers model gives the same names without ``model.``.

    ``backbone`` may also be any module holding one as ``.backbone`` (a denoiser): see :func:`resolve_backbone`.
    Raises ``ValueError`` for other modules (pass explicit names to :func:`capture_features` instead)."""
    root = resolve_backbone(backbone)
    if isinstance(root, MLP):
        return [f"blocks.{i}" for i in range(len(root.blocks))]
    if isinstance(root, SmallUNet):
        return ["down1", "mid1", "mid2", "up1"]
    if isinstance(root, DiffusersBackbone):
        return _diffusers_points(root.model, "model.")
    if _is_diffusers_model(root):
        return _diffusers_points(root, "")
    raise ValueError(f"no default feature points for a {type(root).__name__}: supported backbones are {SUPPORTED} "
                     f"(or a module holding one as .backbone); for another module pass explicit submodule names")


def _targets(module: nn.Module, names: Iterable[str] | str | None) -> dict[str, nn.Module]:
    """``name -> submodule`` for every requested name, all checked before anything is changed."""
    root = resolve_backbone(module)
    names = feature_points(root) if names is None else [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("capture_features needs at least one feature name (or names=None for the defaults)")
    inner, outer = dict(root.named_modules()), dict(module.named_modules())
    found = {name: inner.get(name, outer.get(name)) for name in dict.fromkeys(names)}
    unknown = [name for name, target in found.items() if target is None or name == ""]
    if unknown:
        try:
            valid = feature_points(root)
        except ValueError:
            valid = []
        valid += [name for name in inner if name and name not in valid]
        shown = ", ".join(valid[:8]) + (f", ... ({len(valid)} in all)" if len(valid) > 8 else "")
        raise ValueError(f"unknown feature point(s) {unknown} in {type(root).__name__}: names are dotted submodule "
                         f"names relative to the backbone, e.g. {shown or '(it has no submodules)'}")
    return found


def hidden_states(block: nn.Module, output: object) -> Tensor:
    """The hidden-states tensor of a block's output: the output itself if it is a tensor; for a tuple (diffusers'
    down blocks return ``(hidden_states, residuals)``), its first element, except for the joint-attention blocks
    of SD3 / FLUX (:data:`ENCODER_FIRST_BLOCKS`), which return ``(encoder_hidden_states, hidden_states)`` and
    give their second; for a mapping (a diffusers output object), its first tensor value."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output:
        index = 1 if type(block).__name__ in ENCODER_FIRST_BLOCKS and len(output) >= 2 else 0
        if isinstance(output[index], Tensor):
            return output[index]
    if isinstance(output, Mapping):
        for value in output.values():
            if isinstance(value, Tensor):
                return value
    raise TypeError(f"cannot read a feature tensor from the output of {type(block).__name__} "
                    f"({type(output).__name__}); capture a submodule that returns a tensor")


def capture_features(module: nn.Module, names: Iterable[str] | str | None = None
                     ) -> AbstractContextManager[dict[str, Tensor]]:
    """A context manager recording named intermediate features of ``module`` during its forward calls.

    ``names`` are dotted submodule names (default: :func:`feature_points`), looked up relative to the backbone
    that :func:`resolve_backbone` finds in ``module`` (a denoiser's ``.backbone``), then relative to ``module``
    itself (so ``"backbone.blocks.0"`` works on a denoiser too); any ``nn.Module`` works with explicit names.
    Unknown names raise ``ValueError`` here, at the call, before any hook is registered.

    Entering registers one forward hook per name and yields a dict that fills with ``name -> output`` (see
    :func:`hidden_states` for blocks returning tuples) whenever those submodules run, in the order they first
    run. Outputs are not detached: a loss on them backpropagates into the network. If the submodule runs several
    times inside the block, the last call wins (copy the dict, ``dict(features)``, between calls to keep
    earlier ones). Leaving the block removes every hook, also on an exception; the dict keeps what it recorded.
    Run backward after leaving the block when a diffusers model uses gradient checkpointing: its recomputation
    calls the blocks again, which would re-record them."""
    return _capturing(_targets(module, names))


@contextmanager
def _capturing(targets: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    features: dict[str, Tensor] = {}
    handles = []

    def recorder(name: str):
        def hook(block: nn.Module, args: tuple, output: object) -> None:
            features[name] = hidden_states(block, output)
        return hook

    try:
        for name, target in targets.items():
            handles.append(target.register_forward_hook(recorder(name)))
        yield features
    finally:
        for handle in handles:
            handle.remove()


def pooled(features: Mapping[str, Tensor]) -> Tensor:
    """Each feature reduced to ``(B, C)`` and concatenated along dim 1 in the mapping's order: 2-D ``(B, C)``
    as it is, 3-D token sequences ``(B, N, D)`` averaged over tokens, 4-D+ channel-first maps ``(B, C, H, W)``
    averaged over their spatial dimensions."""
    if not features:
        raise ValueError("pooled needs at least one captured feature (did the network run inside the block?)")
    parts = []
    for name, feature in features.items():
        if feature.ndim < 2:
            raise ValueError(f"feature {name!r} has shape {tuple(feature.shape)}; expected (B, C, ...)")
        dims = () if feature.ndim == 2 else (1,) if feature.ndim == 3 else tuple(range(2, feature.ndim))
        parts.append(feature.mean(dim=dims) if dims else feature)
    return torch.cat(parts, dim=1)


__all__ = ["capture_features", "feature_points", "hidden_states", "pooled", "resolve_backbone"]
