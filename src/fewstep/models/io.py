"""The self-describing model folder: a network denoiser saved so that it can be rebuilt from the folder alone.

A model folder holds two files:

* ``model.safetensors``: the denoiser's ``state_dict`` (backbone weights under ``backbone.``);
* ``fewstep.json``: what is needed to rebuild and read it::

    {"format": "fewstep-model", "version": 1,
     "backbone": {"name": "mlp", "hparams": {...}},        # fewstep.nets.build_backbone(name, **hparams)
     "denoiser": {"kind": "edm", "sigma_data": 0.5},       # fewstep.models.denoiser.denoiser_from_config
     "path": "ve", "prediction": "edm", "time_convention": "c_noise = log(sigma) / 4",   # for readers
     ...caller metadata: "role", "dataset", "data_shape", "normalisation", "guidance", "sampling", "method"}

Folders are written atomically: into a temporary sibling (:func:`fewstep.outputs.sibling`, a name only fewstep
uses) which then replaces ``<name>`` (see :func:`replace_folder`), so a crash never leaves a half-written model
behind. A folder holding anything but a fewstep model of the same role is refused (:func:`fewstep.outputs.claim`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fewstep.errors import CheckpointError
from fewstep.models.denoiser import Denoiser, denoiser_from_config
from fewstep.nets import BACKBONES, build_backbone
from fewstep.outputs import claim, sibling

FORMAT = "fewstep-model"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "fewstep.json"
RESERVED_KEYS = ("format", "version", "backbone", "denoiser", "path", "prediction", "time_convention")


def save_model(folder: str | Path, denoiser: Denoiser, metadata: dict) -> None:
    """Write ``denoiser`` and ``metadata`` to ``folder`` (replacing it atomically if it holds a fewstep model of the
    same ``metadata["role"]``; any other content is refused).

    ``denoiser`` must be a preconditioned network (:class:`EDMDenoiser`, :class:`ConsistencyDenoiser` or
    :class:`PathDenoiser`) around a backbone of :data:`fewstep.nets.BACKBONES`; ``metadata`` must be
    JSON-serialisable and may not use the keys in :data:`RESERVED_KEYS`."""
    folder = Path(folder)
    backbone = getattr(denoiser, "backbone", None)
    names = [name for name, cls in BACKBONES.items() if type(backbone) is cls]
    if not names or not hasattr(denoiser, "config"):
        raise ValueError(f"save_model saves a preconditioned network denoiser with a backbone of "
                         f"{sorted(BACKBONES)}; got {type(denoiser).__name__}")
    clashes = sorted(set(metadata) & set(RESERVED_KEYS))
    if clashes:
        raise ValueError(f"model metadata may not set {clashes}: save_model derives them from the denoiser")
    denoiser_config = denoiser.config()
    description = {"format": FORMAT, "version": VERSION,
                   "backbone": {"name": names[0], "hparams": backbone.hparams},
                   "denoiser": denoiser_config, **reading_of(denoiser_config), **metadata}
    try:
        text = json.dumps(description, indent=2)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model metadata must be JSON-serialisable: {error}") from error

    claim(folder, metadata.get("role", "student"), overwrite=True)
    write_folder(folder, lambda tmp: (
        safetensors.torch.save_file(tensors_for_file(denoiser.state_dict()), tmp / WEIGHTS_FILE),
        (tmp / CONFIG_FILE).write_text(text + "\n")))


def write_folder(folder: Path, write: Callable[[Path], object]) -> None:
    """Make ``folder`` hold what ``write(tmp)`` puts in a fresh staging folder, atomically: staged and synced in a
    sibling only fewstep uses, then renamed into place (:func:`replace_folder`). Claim ``folder`` first."""
    tmp = sibling(folder, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a staging folder a crashed write left: fewstep's own
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        sync_folder(tmp)
        replace_folder(tmp, folder, sibling(folder, "prev"))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_description(folder: str | Path) -> dict:
    """The ``fewstep.json`` of a model folder, checked to be one this fewstep reads (format, version, a weights
    file beside it); any problem raises :class:`CheckpointError` naming the file and the fault."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is not a fewstep model folder: it has no {CONFIG_FILE}")
    try:
        description = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {one_line(error)}") from error
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        found = description.get("format") if isinstance(description, dict) else type(description).__name__
        raise CheckpointError(f"{config_path}: format is {found!r}, expected {FORMAT!r}")
    if description.get("version") not in range(1, VERSION + 1):
        raise CheckpointError(f"{config_path}: version {description.get('version')!r} is not one this fewstep "
                              f"reads (1..{VERSION})")
    for key in ("role", "dataset", "method"):
        if not isinstance(description.get(key, ""), str):
            raise CheckpointError(f"{config_path}: {key} must be a string, got {description[key]!r}")
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    return description


def check_model_files(folder: str | Path) -> dict:
    """:func:`read_description`, then the weights file's header checked against the model the description builds
    (on the meta device: nothing is allocated, no weight is read). Returns the description."""
    folder = Path(folder)
    description = read_description(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    with torch.device("meta"):
        expected = _build(description, config_path).state_dict()
    try:
        with safe_open(str(weights_path), framework="pt") as file:
            shapes = {key: torch.empty(file.get_slice(key).get_shape(), device="meta") for key in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path} is unreadable (truncated or corrupt?): {one_line(error)}") from error
    check_state_fits(shapes, expected, f"{weights_path} does not match {CONFIG_FILE}")
    return description


def load_model(folder: str | Path) -> tuple[Denoiser, dict]:
    """Rebuild the denoiser saved in ``folder`` (on the CPU, in eval mode) and return it with its description
    (the whole ``fewstep.json``). Any problem raises :class:`CheckpointError` naming the file and the fault. The
    weights' shapes are checked against the description on a model without memory (the meta device) before the
    model is built, so a description that would allocate something else than the weights is refused first."""
    folder = Path(folder)
    description = check_model_files(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    denoiser = _build(description, config_path)
    try:
        weights = safetensors.torch.load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path} is unreadable (truncated or corrupt?): {one_line(error)}") from error
    denoiser.load_state_dict(weights, strict=True)
    return denoiser.eval(), description


def _build(description: dict, config_path: Path) -> Denoiser:
    try:
        backbone_spec, denoiser_config = description["backbone"], description["denoiser"]
        backbone = build_backbone(backbone_spec["name"], **backbone_spec["hparams"])
        return denoiser_from_config(backbone, denoiser_config)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise CheckpointError(f"{config_path}: cannot rebuild the model: {type(error).__name__}: "
                              f"{one_line(error)}") from error


def reading_of(denoiser_config: dict) -> dict:
    """Human-readable ``path``, ``prediction`` and ``time_convention`` of a denoiser config."""
    kind = denoiser_config["kind"]
    if kind in ("fixed_extra", "boundary"):
        return reading_of(denoiser_config["denoiser"])
    if kind in ("edm", "consistency"):
        return {"path": "ve", "prediction": kind, "time_convention": "c_noise = log(sigma) / 4"}
    if kind == "two_time":
        target = ("sigma_next / (1 + sigma_next)" if denoiser_config.get("target_time") == "flow_time"
                  else "log(max(sigma_next, zero_level)) / 4")
        return {"path": "ve", "prediction": "edm, target time as extra condition",
                "time_convention": f"c_noise = log(sigma) / 4, extra = {target}"}
    if kind == "path":
        return {"path": denoiser_config["path"]["name"], "prediction": denoiser_config["prediction"],
                "time_convention": f"backbone time = t * {denoiser_config['time_scale']:g}"}
    raise ValueError(f"unknown denoiser kind {kind!r}")


def check_state_fits(loaded: dict[str, Tensor], expected: dict[str, Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` ``"<what>: <fault>"`` unless ``loaded`` has exactly the keys and shapes
    of ``expected``."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing keys {_few(missing)}, unexpected keys {_few(unexpected)}")
    for key, value in expected.items():
        if loaded[key].shape != value.shape:
            raise CheckpointError(f"{what}: {key} has shape {tuple(loaded[key].shape)} in the file but "
                                  f"{tuple(value.shape)} in the model")


def tensors_for_file(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies safetensors can write: every entry gets its own contiguous storage, so tensors shared
    between names (tied weights) are stored once per name and load back with a plain ``load_state_dict``."""
    return {key: value.detach().cpu().clone(memory_format=torch.contiguous_format) for key, value in state.items()}


def sync_folder(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders themselves) to disk before it is renamed into place."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as file:
                os.fsync(file.fileno())
        descriptor = os.open(root, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def replace_folder(new: Path, target: Path, backup: Path) -> None:
    """Make ``new`` become ``target`` by renames; the old ``target`` is kept as ``backup`` until ``new`` is
    in place, then removed. After a crash, whichever of ``target`` or ``backup`` exists is complete: a
    missing ``target`` with a ``backup`` present is restored first."""
    if not target.exists() and backup.exists():
        os.replace(backup, target)
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        os.replace(target, backup)
    try:
        os.replace(new, target)
    except OSError:
        if backup.exists():
            os.replace(backup, target)
        raise
    if backup.exists():
        shutil.rmtree(backup)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _few(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"
