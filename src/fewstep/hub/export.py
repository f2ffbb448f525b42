"""Export a student: the fewstep folder, a diffusers pipeline folder, and diffusers-format LoRA weights.

* ``fewstep``: :meth:`fewstep.Student.save` (``model.safetensors`` + ``fewstep.json`` with path, prediction,
  time convention, sampler and levels per NFE, guidance convention); ``fewstep sample`` reloads it.
* ``diffusers`` (students whose network is a diffusers ``UNet2DModel``): a ``ConsistencyModelPipeline``
  folder (``unet/`` + ``scheduler/``) with a :class:`~fewstep.hub.scheduler.FewstepScheduler` that holds the
  student's preconditioner and levels, so ``pipe(num_inference_steps=k)`` samples exactly as
  ``student.sample(nfe=k)`` (load it after ``import fewstep.hub``).
* ``lora``: the peft LoRA layers of a student's diffusers network (see :func:`add_lora`; diffusers supports
  LoRA on ``UNet2DConditionModel`` and the transformers, not on ``UNet2DModel``) in the file
  ``StableDiffusionLoraLoaderMixin.save_lora_weights`` writes (``pytorch_lora_weights.safetensors``, keys
  under ``unet.``), which ``pipe.load_lora_weights(folder)`` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

from diffusers import ConsistencyModelPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from torch import nn

from fewstep.errors import ConfigError
from fewstep.hub.scheduler import FewstepScheduler
from fewstep.models.io import write_folder
from fewstep.nets.diffusers_backbone import DiffusersBackbone
from fewstep.outputs import EXPORT_KINDS, claim, mark

FORMATS = tuple(EXPORT_KINDS)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ConsistencyModelLoraPipeline(StableDiffusionLoraLoaderMixin, ConsistencyModelPipeline):
    """``ConsistencyModelPipeline`` with ``load_lora_weights`` for its UNet (load an exported folder with
    ``ConsistencyModelLoraPipeline.from_pretrained(folder)``)."""

    _lora_loadable_modules: ClassVar[list[str]] = ["unet"]
    text_encoder = None


def diffusers_network(student) -> nn.Module:
    """The diffusers model inside a student (or its denoiser); a clear error when there is none."""
    denoiser = getattr(student, "denoiser", student)
    backbone = getattr(getattr(denoiser, "denoiser", denoiser), "backbone", None)
    if not isinstance(backbone, DiffusersBackbone):
        raise ConfigError(f"this export needs a student distilled from a diffusers teacher; its network is "
                          f"{type(backbone).__name__} (use --format fewstep)")
    return backbone.model


def export_fewstep(student, out: str | Path) -> None:
    student.save(out)


def export_diffusers(student, out: str | Path, default_nfe: int | None = None) -> None:
    """Write a pipeline folder that ``DiffusionPipeline.from_pretrained(out)`` loads (after ``import
    fewstep.hub``); ``default_nfe`` is the NFE of ``scheduler.set_timesteps`` at load (default: smallest)."""
    unet = diffusers_network(student)
    if type(unet).__name__ != "UNet2DModel":
        raise ConfigError(f"diffusers pipeline export supports UNet2DModel students; this one is "
                          f"{type(unet).__name__} (export --format fewstep or lora instead)")
    sampling = {str(nfe): asdict(spec) for nfe, spec in sorted(student.sampling.items())
                if spec.sampler in ("euler", "consistency")}
    if not sampling:
        raise ConfigError("the student samples with neither 'euler' nor 'consistency' at any NFE; nothing to export")
    scheduler = FewstepScheduler(student.denoiser.config(), sampling,
                                 default_nfe if default_nfe is not None else min(map(int, sampling)))
    pipeline = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    _write_atomically(out, "diffusers", pipeline.save_pretrained)


def add_lora(student, rank: int = 4, alpha: float | None = None,
             target_modules: tuple[str, ...] = LORA_TARGETS) -> nn.Module:
    """Add a peft LoRA adapter to the student's diffusers network (in place) and return the network; train
    the student afterwards to fit the adapter, then :func:`export_lora`."""
    from peft import LoraConfig

    unet = diffusers_network(student)
    if not hasattr(unet, "add_adapter"):
        raise ConfigError(f"diffusers has no LoRA support for {type(unet).__name__}; LoRA export works for "
                          "UNet2DConditionModel and the transformer teachers")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                target_modules=list(target_modules), init_lora_weights="gaussian"))
    return unet


def export_lora(student, out: str | Path) -> None:
    """Save the student's LoRA layers for ``pipe.load_lora_weights(out)``."""
    from peft.utils import get_peft_model_state_dict

    unet = diffusers_network(student)
    if not getattr(unet, "_hf_peft_config_loaded", False):
        raise ConfigError("the student has no LoRA adapter to export; add one with fewstep.hub.add_lora "
                          "before distilling, or export --format diffusers")
    layers = get_peft_model_state_dict(unet)
    _write_atomically(out, "lora", lambda folder: ConsistencyModelLoraPipeline.save_lora_weights(
        folder, unet_lora_layers=layers))


def export_student(student, out: str | Path, format: str = "fewstep", overwrite: bool = False) -> None:
    """Export ``student`` to ``out`` in one of :data:`FORMATS`; ``out`` must be new or empty, or (with
    ``overwrite``) an export of the same format (:func:`fewstep.outputs.claim`)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    claim(out, EXPORT_KINDS[format], overwrite)
    {"fewstep": export_fewstep, "diffusers": export_diffusers, "lora": export_lora}[format](student, out)


def _write_atomically(out: str | Path, kind: str, write: Callable[[Path], object]) -> None:
    """``write(folder)`` into a staging folder, marked as a fewstep ``kind``, that then replaces ``out``."""
    out = claim(out, kind, overwrite=True)

    def staged(folder: Path) -> None:
        write(folder)
        mark(folder, kind)

    write_folder(out, staged)

