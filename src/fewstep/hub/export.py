"""Export a student: the fewstep folder, a diffusers pipeline folder, and diffusers-format LoRA weights.

* ``fewstep``: :meth:`fewstep.Student.save` (``model.safetensors`` + ``fewstep.json`` with path, prediction,
  time convention, sampler and levels per NFE, guidance convention); ``fewstep sample`` reloads it.
* ``diffusers``: a pipeline folder with a :class:`~fewstep.hub.scheduler.FewstepScheduler` that holds the
  student's preconditioner and levels, so ``pipe(num_inference_steps=k)`` samples exactly as
  ``student.sample(nfe=k)`` (load it after ``import fewstep.hub``). A ``UNet2DModel`` student gives a
  ``ConsistencyModelPipeline`` (``unet/`` + ``scheduler/``); a student of a text-to-image pipeline (SD, SDXL,
  SD3, FLUX) gives that pipeline with the student's network (a LoRA adapter fused into it) and the scheduler, so
  ``pipe(prompt, num_inference_steps=k, guidance_scale=1)`` gives the student's images (guidance, if the teacher
  had it, is distilled into the student). SD3 and FLUX do not scale their initial noise: pass
  ``latents=pipeline_latents(pipe, noise)`` (:func:`fewstep.hub.pipelines.pipeline_latents`) for the student's
  exact samples.
* ``lora``: the peft LoRA layers of a student's diffusers network (see :func:`add_lora`; diffusers supports
  LoRA on ``UNet2DConditionModel`` and the transformers, not on ``UNet2DModel``) in the file the pipeline's
  ``save_lora_weights`` writes (``pytorch_lora_weights.safetensors``), which ``pipe.load_lora_weights(folder)``
  reads, with the student's scheduler in ``scheduler/``
  (``pipe.scheduler = FewstepScheduler.from_pretrained(folder, subfolder="scheduler")``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

from diffusers import ConsistencyModelPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from torch import nn

from fewstep.errors import ConfigError
from fewstep.hub.pipelines import load_pipeline, pipeline_kind
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
    backbone = getattr(getattr(student.denoiser, "denoiser", student.denoiser), "backbone", None)
    if getattr(getattr(backbone, "model", None), "_hf_peft_config_loaded", False):
        raise ConfigError("a LoRA student exports as --format lora (the adapter) or diffusers (a pipeline with it "
                          "fused), not as a fewstep folder")
    student.save(out)


def student_scheduler(student, default_nfe: int | None = None) -> FewstepScheduler:
    """The :class:`FewstepScheduler` that samples as ``student`` does at each NFE it has an ``euler`` or
    ``consistency`` schedule for, for the loop of the pipeline it was distilled from (if any); ``default_nfe`` is
    the NFE set at load (default: smallest)."""
    sampling = {str(nfe): asdict(spec) for nfe, spec in sorted(student.sampling.items())
                if spec.sampler in ("euler", "consistency")}
    if not sampling:
        raise ConfigError("the student samples with neither 'euler' nor 'consistency' at any NFE; nothing to export")
    folder = teacher_pipeline(student)
    kind = None if folder is None else pipeline_kind(folder)[1]
    loop = {} if kind is None or kind.scales_input else {
        "state": "network", "timestep_scale": kind.timestep_scale,
        "packed_shape": list(student.dataset.data_shape) if kind.packed else None}
    return FewstepScheduler(student.denoiser.config(), sampling,
                            default_nfe if default_nfe is not None else min(map(int, sampling)), **loop)


def teacher_pipeline(student) -> Path | None:
    """The pipeline folder a text-to-image student was distilled from (its ``teacher`` metadata), or None."""
    teacher = str(student.metadata.get("teacher", ""))
    return Path(teacher.removeprefix("pipeline:")) if teacher.startswith("pipeline:") else None


def export_diffusers(student, out: str | Path, default_nfe: int | None = None) -> None:
    """Write a pipeline folder that ``DiffusionPipeline.from_pretrained(out)`` loads (after ``import
    fewstep.hub``); ``default_nfe`` is the NFE of ``scheduler.set_timesteps`` at load (default: smallest)."""
    network = diffusers_network(student)
    kind = type(network).__name__
    folder = teacher_pipeline(student)
    if folder is not None:
        pipeline = load_pipeline(folder)
        network = copy.deepcopy(network)
        if getattr(network, "_hf_peft_config_loaded", False):
            network.fuse_lora()
            network.unload_lora()
        pipeline.register_modules(**{pipeline_kind(folder)[1].network: network},
                                  scheduler=student_scheduler(student, default_nfe))
    elif kind == "UNet2DModel":
        pipeline = ConsistencyModelPipeline(unet=network, scheduler=student_scheduler(student, default_nfe))
    else:
        raise ConfigError(f"diffusers pipeline export supports UNet2DModel students and students of a text-to-image "
                          f"pipeline; this one is a {kind} (export --format fewstep or lora instead)")
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
    folder = teacher_pipeline(student)
    if folder is None:
        loader, keyword = ConsistencyModelLoraPipeline, "unet_lora_layers"
    else:
        import diffusers

        name, kind = pipeline_kind(folder)
        loader, keyword = getattr(diffusers, name), f"{kind.network}_lora_layers"
    scheduler = student_scheduler(student) if folder is not None else None

    def write(target: Path) -> None:
        loader.save_lora_weights(target, **{keyword: layers})
        if scheduler is not None:
            scheduler.save_pretrained(target / "scheduler")

    _write_atomically(out, "lora", write)


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

