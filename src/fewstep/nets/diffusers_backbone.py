"""A diffusers model (UNet or transformer) as a fewstep backbone ``F(x, t_model, cond=None, extra=None)``.

``t_model`` is passed to the model as its ``timestep`` unchanged: the preconditioner around the backbone
(:class:`~fewstep.models.denoiser.PathDenoiser` for a teacher) scales time to the model's convention. Text
conditioning comes with each batch as a :class:`~fewstep.conditions.TextCondition` (per-token embeddings, mask,
pooled vector); without one, the backbone uses a fixed tensor of precomputed ``encoder_hidden_states`` (and
``pooled_projections`` for SD3 / FLUX) held as buffers, so no text encoder is needed. Each model family's call:

* ``UNet2DModel``: ``model(x, t, class_labels=label)``;
* ``UNet2DConditionModel``: ``model(x, t, encoder_hidden_states)``; an SDXL-style one (``addition_embed_type
  "text_time"``) also takes the pooled vector and the size conditioning ``time_ids`` fixed at construction;
* ``DiTTransformer2DModel`` / ``Transformer2DModel``: ``model(x, t, class_labels=label)`` (a missing label
  is the null class); a learned-variance output keeps its first ``C`` channels;
* ``SD3Transformer2DModel``: ``model(x, encoder_hidden_states, pooled_projections, t)``;
* ``SanaTransformer2DModel``: ``model(x, encoder_hidden_states, t)``;
* ``FluxTransformer2DModel``: ``x`` packed into 2x2 patches with position ids, ``pooled_projections`` and
  (for guidance-distilled models) the embedded ``guidance`` scale.

``diffusers`` is imported only when a backbone is built.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.conditions import Condition, TextCondition
from fewstep.errors import ConfigError, DataError

MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel",
                 "SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel")
NEEDS_TEXT = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel")
NEEDS_POOLED = ("SD3Transformer2DModel", "FluxTransformer2DModel")
LABELLED = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel")


def check_model_class(name: str) -> None:
    if name not in MODEL_CLASSES:
        raise ConfigError(f"diffusers model class {name!r} is not supported as a fewstep teacher; use one of "
                          f"{', '.join(MODEL_CLASSES)}")


class DiffusersBackbone(nn.Module):
    """A diffusers model called as a fewstep backbone. ``hparams`` rebuild it (with fresh weights) from the
    model's config; ``model`` wraps an already-built model instead."""

    def __init__(self, model_class: str, model_config: dict, data_shape: list[int], num_classes: int = 0,
                 encoder_hidden_states_shape: list[int] | None = None,
                 pooled_projections_shape: list[int] | None = None, guidance: float | None = None,
                 model: nn.Module | None = None, time_ids: list[float] | None = None):
        super().__init__()
        check_model_class(model_class)
        if model is None:
            import diffusers

            model = getattr(diffusers, model_class).from_config(model_config)
        self.model, self.model_class = model, model_class
        self.data_shape, self.num_classes, self.guidance = tuple(data_shape), int(num_classes), guidance
        self.time_ids = None if time_ids is None else [float(value) for value in time_ids]
        if model.config.get("addition_embed_type") == "text_time" and (time_ids is None or pooled_projections_shape
                                                                         is None):
            raise ConfigError(f"this {model_class} (SDXL-style) needs pooled_projections and time_ids (the size "
                              "conditioning (H, W, top, left, H, W)): build it with fewstep.hub.pipelines")
        if model_class in NEEDS_TEXT and encoder_hidden_states_shape is None:
            raise ConfigError(f"a {model_class} teacher needs text conditioning: pass encoder_hidden_states "
                              "(precomputed prompt embeddings, shape (1 or B, tokens, dim))")
        if model_class in NEEDS_POOLED and pooled_projections_shape is None:
            raise ConfigError(f"a {model_class} teacher needs pooled_projections (precomputed pooled prompt "
                              "embeddings, shape (1 or B, dim))")
        self.register_buffer("encoder_hidden_states", None if encoder_hidden_states_shape is None
                             else torch.zeros(encoder_hidden_states_shape))
        self.register_buffer("pooled_projections", None if pooled_projections_shape is None
                             else torch.zeros(pooled_projections_shape))
        self.hparams = {"model_class": model_class, "model_config": dict(model.config),
                        "data_shape": list(data_shape), "num_classes": self.num_classes,
                        "encoder_hidden_states_shape": encoder_hidden_states_shape,
                        "pooled_projections_shape": pooled_projections_shape, "guidance": guidance,
                        "time_ids": self.time_ids}

    def set_conditioning(self, encoder_hidden_states: Tensor | None = None,
                         pooled_projections: Tensor | None = None) -> None:
        """Replace the stored prompt embeddings (same shapes as at construction)."""
        for name, value in (("encoder_hidden_states", encoder_hidden_states),
                            ("pooled_projections", pooled_projections)):
            if value is None:
                continue
            current = getattr(self, name)
            if current is None or current.shape != value.shape:
                raise DataError(f"{name} must have shape {None if current is None else tuple(current.shape)}, "
                                f"got {tuple(value.shape)}")
            current.copy_(value)

    def _text(self, cond: TextCondition | None, batch: int, dtype: torch.dtype) -> TextCondition:
        """The batch's text condition, else the stored prompt embeddings repeated for the batch."""
        if cond is not None:
            return cond.to(dtype=dtype) if cond.mask is None else TextCondition(
                cond.embeddings.to(dtype), cond.mask, None if cond.pooled is None else cond.pooled.to(dtype))
        if self.encoder_hidden_states is None:
            raise DataError(f"this {self.model_class} needs text: give the batch a TextCondition or build the "
                            "backbone with encoder_hidden_states")
        pooled = None if self.pooled_projections is None else self.pooled_projections.to(dtype).expand(
            batch, *self.pooled_projections.shape[1:])
        return TextCondition(self.encoder_hidden_states.to(dtype).expand(batch, *self.encoder_hidden_states.shape[1:]),
                             None, pooled)

    def forward(self, x: Tensor, t_model: Tensor, cond: Condition | None = None, extra: Tensor | None = None):
        """``cond``: class labels for the labelled models, a :class:`~fewstep.conditions.TextCondition` (or None
        for the stored prompt) for the text models."""
        if extra is not None:
            raise DataError("diffusers backbones take no extra scalar conditions; use a method without them")
        batch, dtype = x.shape[0], self.model.dtype
        t = torch.as_tensor(t_model, device=x.device).to(dtype).expand(batch)
        h = x.to(dtype)
        kind = self.model_class
        text = cond if isinstance(cond, TextCondition) else None
        label = cond if isinstance(cond, Tensor) else None
        if kind in LABELLED and self.num_classes > 0 and label is None:
            label = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
        if kind == "UNet2DModel":
            out = self.model(h, t, class_labels=label if self.num_classes else None, return_dict=False)[0]
        elif kind == "UNet2DConditionModel":
            text = self._text(text, batch, dtype)
            added = None if self.time_ids is None else {
                "text_embeds": text.pooled, "time_ids": torch.tensor(self.time_ids, dtype=dtype, device=x.device
                                                                     ).expand(batch, -1)}
            out = self.model(h, t, encoder_hidden_states=text.embeddings, encoder_attention_mask=text.mask,
                             added_cond_kwargs=added, return_dict=False)[0]
        elif kind in ("DiTTransformer2DModel", "Transformer2DModel"):
            kwargs = {} if text is None and self.encoder_hidden_states is None else {
                "encoder_hidden_states": self._text(text, batch, dtype).embeddings}
            out = self.model(h, timestep=t, class_labels=label, return_dict=False, **kwargs)[0]
        elif kind == "SD3Transformer2DModel":
            text = self._text(text, batch, dtype)
            out = self.model(h, encoder_hidden_states=text.embeddings, pooled_projections=text.pooled,
                             timestep=t, return_dict=False)[0]
        elif kind == "SanaTransformer2DModel":
            text = self._text(text, batch, dtype)
            out = self.model(h, encoder_hidden_states=text.embeddings, encoder_attention_mask=text.mask,
                             timestep=t, return_dict=False)[0]
        else:
            out = self._flux(h, t, self._text(text, batch, dtype), dtype)
        return out[:, : x.shape[1]]

    def _flux(self, h: Tensor, t: Tensor, text: TextCondition, dtype: torch.dtype) -> Tensor:
        """FLUX works on 2x2 patches ``(B, H/2 * W/2, 4 C)`` with 3-component position ids."""
        batch, c, height, width = h.shape
        img_ids = torch.zeros(height // 2, width // 2, 3, device=h.device, dtype=dtype)
        img_ids[..., 1] += torch.arange(height // 2, device=h.device, dtype=dtype)[:, None]
        img_ids[..., 2] += torch.arange(width // 2, device=h.device, dtype=dtype)[None, :]
        txt_ids = torch.zeros(text.embeddings.shape[1], 3, device=h.device, dtype=dtype)
        guidance = None if self.guidance is None else torch.full((batch,), self.guidance, device=h.device,
                                                                  dtype=dtype)
        out = self.model(pack_patches(h), encoder_hidden_states=text.embeddings, pooled_projections=text.pooled,
                         timestep=t, img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids, guidance=guidance,
                         return_dict=False)[0]
        return unpack_patches(out, (c, height, width))


def pack_patches(h: Tensor) -> Tensor:
    """``(B, C, H, W)`` latents as FLUX's sequence of 2x2 patches ``(B, H/2 * W/2, 4 C)``."""
    batch, c, height, width = h.shape
    packed = h.reshape(batch, c, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return packed.reshape(batch, (height // 2) * (width // 2), c * 4)


def unpack_patches(packed: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """The inverse of :func:`pack_patches` for latents of ``shape`` ``(C, H, W)``."""
    c, height, width = shape
    out = packed.reshape(packed.shape[0], height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(packed.shape[0], c, height, width)
