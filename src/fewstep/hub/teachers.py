"""Diffusers models as fewstep teachers: the scheduler config says how to read the network.

* DDPM-style schedulers (``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``, ...): the
  discrete VP path of the scheduler's own ``alphas_cumprod`` (:class:`~fewstep.paths.VPDiscrete`), time =
  the training timestep index, prediction from ``prediction_type`` (``epsilon`` -> eps,
  ``v_prediction`` -> v, ``sample`` -> x0).
* ``FlowMatchEulerDiscreteScheduler``: rectified flow ``x_t = (1 - t) x0 + t eps`` with velocity
  ``eps - x0``; the model's timestep is ``t * num_train_timesteps`` (FLUX takes ``t`` and scales it
  itself; SANA multiplies by its ``timestep_scale``). The scheduler's ``shift`` only moves where its own
  sampler puts steps; it is kept in :func:`scheduler_reading` for reference.

The teacher is a :class:`~fewstep.models.denoiser.PathDenoiser` around a
:class:`~fewstep.nets.diffusers_backbone.DiffusersBackbone`, so it answers ``x0 = D(x, s)`` in the VE
coordinate like every other teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from fewstep.errors import ConfigError
from fewstep.models.denoiser import PathDenoiser
from fewstep.nets.diffusers_backbone import DiffusersBackbone, check_model_class
from fewstep.paths import RectifiedFlow, VPDiscrete

VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                 "HeunDiscreteScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                 "LCMScheduler", "TCDScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
MODEL_FOLDERS = ("unet", "transformer")


def scheduler_reading(scheduler_config, model_class: str, model_config: dict) -> dict:
    """``{"path", "prediction", "time_scale", "shift"}`` of a teacher whose scheduler has this config (the
    ``scheduler_config.json`` dict, or a diffusers scheduler)."""
    if not isinstance(scheduler_config, dict):
        scheduler_config = {**scheduler_config.config, "_class_name": type(scheduler_config).__name__}
    name = scheduler_config.get("_class_name")
    if name in VP_SCHEDULERS:
        import diffusers

        scheduler = getattr(diffusers, name).from_config(scheduler_config)
        kind = scheduler_config.get("prediction_type", "epsilon")
        if kind not in PREDICTIONS:
            raise ConfigError(f"scheduler prediction_type {kind!r} is not supported; use one of {sorted(PREDICTIONS)}")
        return {"path": VPDiscrete(scheduler.alphas_cumprod.tolist()), "prediction": PREDICTIONS[kind],
                "time_scale": 1.0, "shift": None}
    if name in FLOW_SCHEDULERS:
        scale = 1.0 if model_class == "FluxTransformer2DModel" else float(
            scheduler_config.get("num_train_timesteps", 1000))
        if model_class == "SanaTransformer2DModel":
            scale *= float(model_config.get("timestep_scale", 1.0))
        return {"path": RectifiedFlow(), "prediction": "velocity", "time_scale": scale,
                "shift": float(scheduler_config.get("shift", 1.0))}
    raise ConfigError(f"scheduler {name!r} is not supported for a diffusers teacher; its folder needs a "
                      f"scheduler_config.json of one of {', '.join(VP_SCHEDULERS + FLOW_SCHEDULERS)}")


def diffusers_denoiser(model: nn.Module, scheduler_config, data_shape: tuple[int, ...] | None = None,
                       num_classes: int | None = None, encoder_hidden_states: Tensor | None = None,
                       pooled_projections: Tensor | None = None, guidance: float | None = None,
                       time_ids: list[float] | None = None) -> PathDenoiser:
    """A built diffusers model read as a denoiser, with path, prediction and time scale from its scheduler
    (a diffusers scheduler or its config dict).

    ``data_shape`` defaults to ``(in_channels, sample_size, sample_size)`` (required for FLUX, whose config
    has no image size: give the unpacked latent shape ``(C, H, W)``). ``num_classes`` defaults to the
    model's class-embedding count (0 for unconditional and text models). ``time_ids``: an SDXL UNet's size
    conditioning."""
    model_class = type(model).__name__
    check_model_class(model_class)
    config = dict(model.config)
    if data_shape is None:
        size = config.get("sample_size")
        if size is None or model_class == "FluxTransformer2DModel":
            raise ConfigError(f"pass data_shape=(C, H, W) for a {model_class} teacher: its config has no image size")
        size = (size, size) if isinstance(size, int) else tuple(size)
        data_shape = (config["in_channels"], *size)
    if num_classes is None:
        num_classes = int(config.get("num_class_embeds") or 0) if model_class == "UNet2DModel" else int(
            config.get("num_embeds_ada_norm") or 0) if model_class in ("DiTTransformer2DModel",
                                                                       "Transformer2DModel") else 0
    backbone = DiffusersBackbone(
        model_class, config, list(data_shape), num_classes,
        None if encoder_hidden_states is None else list(encoder_hidden_states.shape),
        None if pooled_projections is None else list(pooled_projections.shape), guidance, model=model,
        time_ids=time_ids)
    backbone.set_conditioning(encoder_hidden_states, pooled_projections)
    reading = scheduler_reading(scheduler_config, model_class, config)
    return PathDenoiser(backbone, reading["path"], reading["prediction"], reading["time_scale"])


def _read_json(path_or_id: str, subfolder: str, filename: str, what: str) -> dict:
    """A config file from a local folder, or from the hub (cache or network) for a repository id."""
    folder = Path(path_or_id)
    if folder.is_dir():
        file = folder / subfolder / filename
        if not file.is_file():
            raise ConfigError(f"{folder} has no {what} ({Path(subfolder) / filename}); point at a diffusers folder "
                              f"that has one, or pass the subfolder that holds it")
        return json.loads(file.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path_or_id, filename, subfolder=subfolder or None)).read_text())
    except Exception as error:
        raise ConfigError(f"cannot read the {what} of {path_or_id!r} (not a local folder, and the hub gave "
                          f"{type(error).__name__}); use a local diffusers folder offline") from error


def load_diffusers_denoiser(path_or_id: str | Path, subfolder: str | None = None,
                            scheduler_subfolder: str = "scheduler", encoder_hidden_states: Tensor | None = None,
                            pooled_projections: Tensor | None = None, data_shape: tuple[int, ...] | None = None,
                            num_classes: int | None = None, guidance: float | None = None,
                            torch_dtype: torch.dtype | None = None) -> PathDenoiser:
    """The denoiser of a diffusers pipeline or model folder (or a hub repository id): the network read from
    ``subfolder`` (default: ``unet`` or ``transformer``, whichever exists, else the folder itself), read by the
    scheduler config in ``scheduler_subfolder`` (:func:`diffusers_denoiser`). :meth:`fewstep.Teacher.from_diffusers`
    makes a teacher of it."""
    path_or_id = str(path_or_id)
    local = Path(path_or_id)
    if subfolder is None:
        subfolder = next((name for name in MODEL_FOLDERS if (local / name / "config.json").is_file()), "") \
            if local.is_dir() else "unet"
    model_config = _read_json(path_or_id, subfolder, "config.json", "model config")
    scheduler_config = _read_json(path_or_id, scheduler_subfolder, "scheduler_config.json", "scheduler config")
    model_class = model_config.get("_class_name", "?")
    check_model_class(model_class)
    scheduler_reading(scheduler_config, model_class, model_config)  # refuse an unsupported scheduler before loading
    import diffusers

    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    model = getattr(diffusers, model_class).from_pretrained(path_or_id, subfolder=subfolder or None, **kwargs)
    return diffusers_denoiser(model, scheduler_config, data_shape, num_classes, encoder_hidden_states,
                              pooled_projections, guidance)
