"""Text-to-image teachers from a diffusers pipeline folder: the pipeline's own text encoders turn a prompt file into
text conditions (cached on disk), its VAE gives the latent space the teacher and student work in, and its UNet or
transformer is the teacher's network.

Supported pipelines and what their encoders give (:data:`PIPELINES`):

* ``StableDiffusionPipeline``: CLIP per-token embeddings;
* ``StableDiffusionXLPipeline``: two CLIP encoders' embeddings joined, the second's pooled vector, and the size
  conditioning ``(H, W, 0, 0, H, W)`` of the resolution (no crop);
* ``StableDiffusion3Pipeline``: two CLIP encoders and T5 (T5 may be absent: zeros, as diffusers does), pooled CLIP;
* ``FluxPipeline``: T5 per-token embeddings and pooled CLIP.

The empty prompt (or ``negative_prompt``) is the null condition of classifier-free guidance. Encodings are cached
in ``cache_dir()/prompts``, keyed by the pipeline's text encoders and tokenizers (their files' names, sizes and
modification times), the prompts and the negative prompt, so a second run encodes nothing
(:data:`ENCODED` counts the prompts actually encoded).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewstep.cache import atomic_write, cache_dir
from fewstep.conditions import TextCondition
from fewstep.data.images import dataset_captions, dataset_images, image_files, read_captions, read_images, square_image
from fewstep.data.saved_datasets import is_saved_dataset
from fewstep.data.spec import DatasetSpec
from fewstep.errors import ConfigError, DataError
from fewstep.hub.teachers import diffusers_denoiser
from fewstep.models.denoiser import PathDenoiser
from fewstep.nets.diffusers_backbone import pack_patches


@dataclass(frozen=True)
class PipelineKind:
    """What fewstep reads from a pipeline class: its network folder and the components its encoders need; how its
    sampling loop treats a scheduler: ``scales_input`` (it scales the initial noise by ``init_noise_sigma`` and calls
    ``scale_model_input``), ``timestep_scale`` (it divides the scheduler's timesteps by this before the network) and
    ``packed`` (it holds latents as 2x2 patches)."""

    network: str
    encoders: tuple[str, ...]
    optional: tuple[str, ...] = ()
    size_conditioning: bool = False
    scales_input: bool = True
    timestep_scale: float = 1.0
    packed: bool = False


PIPELINES = {
    "StableDiffusionPipeline": PipelineKind("unet", ("text_encoder", "tokenizer")),
    "StableDiffusionXLPipeline": PipelineKind("unet", ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                                              size_conditioning=True),
    "StableDiffusion3Pipeline": PipelineKind("transformer", ("text_encoder", "tokenizer", "text_encoder_2",
                                                             "tokenizer_2"), ("text_encoder_3", "tokenizer_3"),
                                             scales_input=False),
    "FluxPipeline": PipelineKind("transformer", ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                                 scales_input=False, timestep_scale=1000.0, packed=True),
}
ENCODED = {"prompts": 0, "images": 0}  # run through an encoder in this process (cache hits do not count)


def pipeline_kind(folder: str | Path) -> tuple[str, PipelineKind]:
    """The pipeline class named by ``folder/model_index.json`` and what fewstep reads from it; refuses a folder that
    is not a supported pipeline or misses a component, naming it, before anything is loaded."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except ValueError:
        raise ConfigError(f"{index_file} is not valid JSON") from None
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ConfigError(f"pipeline {name!r} in {folder} is not supported for text-to-image distillation; use one "
                          f"of {', '.join(PIPELINES)}")
    kind = PIPELINES[name]
    for component in (kind.network, "vae", "scheduler", *kind.encoders):
        entry = index.get(component)
        if not entry or entry[0] is None or not (folder / component).is_dir():
            raise ConfigError(f"pipeline folder {folder} is missing its {component} ({folder / component}); a "
                              f"{name} needs {', '.join((kind.network, 'vae', 'scheduler', *kind.encoders))}")
    return name, kind


def load_pipeline(folder: str | Path, torch_dtype: torch.dtype | None = None):
    """The diffusers pipeline in ``folder`` (checked by :func:`pipeline_kind` first); an optional component the
    folder lacks (SD3's T5) is left out, as diffusers allows."""
    _, kind = pipeline_kind(folder)
    import diffusers

    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    kwargs |= {component: None for component in kind.optional if not (Path(folder) / component).is_dir()}
    return diffusers.DiffusionPipeline.from_pretrained(str(folder), **kwargs)


def _encode(pipe, prompts: list[str]) -> TextCondition:
    """``prompts`` through the pipeline's own ``encode_prompt`` (no guidance: one row per prompt)."""
    name, device = type(pipe).__name__, pipe.device
    ENCODED["prompts"] += len(prompts)
    with torch.no_grad():
        if name == "StableDiffusionPipeline":
            embeddings, _ = pipe.encode_prompt(prompts, device, 1, False)
            return TextCondition(embeddings)
        if name in ("StableDiffusionXLPipeline", "StableDiffusion3Pipeline"):
            embeddings, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False,
                                                          **({"prompt_2": None, "prompt_3": None} if "3" in name
                                                             else {"num_images_per_prompt": 1}))
            return TextCondition(embeddings, None, pooled)
        embeddings, pooled, _ = pipe.encode_prompt(prompts, None, device=device)
        return TextCondition(embeddings, None, pooled)


def _warn_long(pipe, prompts: list[str], source: str) -> None:
    """Warn, naming each, about prompts longer than the CLIP tokenizer's limit (the encoders truncate them)."""
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    for number, prompt in enumerate(prompts, 1):
        length = len(tokenizer(prompt).input_ids)
        if length > limit:
            warnings.warn(f"{source}: prompt {number} ({prompt[:40]!r}...) has {length} tokens, more than the text "
                          f"encoder's {limit}; it is truncated", stacklevel=3)


def _encoder_identity(folder: Path, kind: PipelineKind) -> list:
    """The encoders' and tokenizers' files (name, size, modification time): a cache key that changes with them."""
    files = []
    for component in (*kind.encoders, *kind.optional):
        if (folder / component).is_dir():
            files += [(str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                      for f in sorted((folder / component).rglob("*")) if f.is_file()]
    return files


def encode_prompts(pipe, folder: str | Path, prompts: list[str], negative_prompt: str = "",
                   source: str = "prompts") -> tuple[TextCondition, TextCondition]:
    """``(conditions of prompts, the one-row null condition)`` from the pipeline's encoders, cached on disk."""
    folder = Path(folder)
    _, kind = pipeline_kind(folder)
    key = hashlib.sha256(json.dumps({"pipeline": str(folder.resolve()), "encoders": _encoder_identity(folder, kind),
                                     "prompts": prompts, "negative": negative_prompt}).encode()).hexdigest()[:24]
    file = cache_dir() / "prompts" / f"{key}.safetensors"
    if file.is_file():
        tensors = load_file(file)
        return _condition(tensors, "prompt"), _condition(tensors, "null")
    _warn_long(pipe, prompts, source)
    conditions = _encode(pipe, prompts)
    null = _encode(pipe, [negative_prompt])
    tensors = {f"{role}.{name}": value.contiguous().cpu() for role, cond in (("prompt", conditions), ("null", null))
               for name, value in (("embeddings", cond.embeddings), ("mask", cond.mask), ("pooled", cond.pooled))
               if value is not None}
    atomic_write(file, lambda tmp: save_file(tensors, tmp))
    return conditions, null


def encode_images(pipe, folder: str | Path, resolution: int) -> tuple[Tensor, list[str]]:
    """``(latents, captions)`` of the image folder or saved dataset ``folder`` (:mod:`fewstep.data.images`,
    :mod:`fewstep.data.saved_datasets`) at ``resolution`` pixels, encoded once by the pipeline's VAE and cached,
    keyed by the VAE's and the images' files."""
    folder = Path(folder)
    saved = is_saved_dataset(folder)
    files = sorted(f for f in folder.rglob("*") if f.is_file()) if saved else image_files(folder)
    identity = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    vae_files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(pipe.vae.config._name_or_path
                                                                                      ).rglob("*")) if f.is_file()]
    key = hashlib.sha256(json.dumps({"images": identity, "vae": [str(pipe.vae.config._name_or_path), vae_files],
                                     "resolution": resolution}).encode()).hexdigest()[:24]
    file = cache_dir() / "latents" / f"{key}.safetensors"
    captions = dataset_captions(folder) if saved else read_captions(files)
    if file.is_file():
        return load_file(file)["latents"], captions
    if saved:
        images = torch.stack([square_image(picture, resolution) for picture in dataset_images(folder)])
    else:
        images = read_images(files, resolution)
    codec = LatentCodec(pipe.vae)
    latents = torch.cat([codec.encode(images[i:i + 16].to(pipe.device)).float().cpu()
                         for i in range(0, len(images), 16)])
    ENCODED["images"] += len(images)
    atomic_write(file, lambda tmp: save_file({"latents": latents.contiguous()}, tmp))
    return latents, captions


def _condition(tensors: dict[str, Tensor], role: str) -> TextCondition:
    return TextCondition(tensors[f"{role}.embeddings"], tensors.get(f"{role}.mask"), tensors.get(f"{role}.pooled"))


class LatentCodec(nn.Module):
    """A pipeline's VAE between images in ``[-1, 1]`` and the scaled latents its network works on:
    ``z = (E(image) - shift) * scale`` (the mean of the encoder's distribution) and ``image = D(z / scale + shift)``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return (self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode() - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode((latents / self.scale + self.shift).to(self.vae.dtype)).sample


def pixel_resolution(pipe, resolution: int | None = None) -> int:
    """``resolution`` in pixels checked against the pipeline (a multiple of the VAE's factor times the patch of 2),
    or the network's own size."""
    name = type(pipe).__name__
    factor = int(pipe.vae_scale_factor)
    size = getattr(pipe, PIPELINES[name].network).config.get("sample_size")
    if resolution is None:
        if size is None:
            raise ConfigError(f"a {name} has no default image size: give the resolution in pixels")
        resolution = (size if isinstance(size, int) else size[0]) * factor
    if resolution % (factor * 2) or resolution < factor * 2:
        raise ConfigError(f"resolution {resolution} must be a positive multiple of {factor * 2} (the VAE's factor "
                          f"{factor} times the network's patch of 2)")
    return resolution


def pipeline_denoiser(pipe, resolution: int, placeholder: TextCondition) -> PathDenoiser:
    """The pipeline's network read as a fewstep denoiser on latents of ``resolution`` pixels
    (:func:`pixel_resolution`), conditioned per batch on text; ``placeholder`` (one row, e.g. the null condition)
    is the stored condition that fixes the embeddings' shapes."""
    kind = PIPELINES[type(pipe).__name__]
    factor = int(pipe.vae_scale_factor)
    shape = (int(pipe.vae.config.latent_channels), resolution // factor, resolution // factor)
    time_ids = [resolution, resolution, 0, 0, resolution, resolution] if kind.size_conditioning else None
    return diffusers_denoiser(getattr(pipe, kind.network), pipe.scheduler, shape, 0, placeholder.embeddings,
                              placeholder.pooled, time_ids=time_ids)


def pipeline_latents(pipe, noise: Tensor, nfe: int) -> Tensor:
    """The ``latents=`` argument that starts ``pipe``, holding a student's exported scheduler, from the student's first
    state for unit ``noise`` ``(B, C, H, W)`` at ``nfe`` steps: ``noise`` itself for pipelines that scale it (SD,
    SDXL), ``noise * init_noise_sigma`` (packed for FLUX) for those that do not."""
    kind = PIPELINES[type(pipe).__name__]
    if kind.scales_input:
        return noise
    pipe.scheduler.set_timesteps(nfe)
    latents = noise * pipe.scheduler.init_noise_sigma
    return pack_patches(latents) if kind.packed else latents


def prompt_dataset(name: str, data_shape: tuple[int, ...], conditions: TextCondition, prompts: list[str],
                   latents: Tensor | None = None, captions: TextCondition | None = None) -> DatasetSpec:
    """The dataset of a text-to-image job: its prompts' conditions (what data-free sources draw), and, where real
    images were given, their latents with their captions' conditions. ``prompts`` are the texts of ``conditions``."""
    empty = torch.zeros((0, *data_shape))
    if (latents is None) != (captions is None) or (latents is not None and len(latents) != len(captions)):
        raise DataError("give image latents and their captions' conditions together, one caption per image")
    train = empty if latents is None else latents
    return DatasetSpec(name, tuple(data_shape), train, empty, 0, train_y=captions, kind="images", metric="fd",
                       conditions=conditions, prompts=prompts, description="prompts of a text-to-image pipeline")
