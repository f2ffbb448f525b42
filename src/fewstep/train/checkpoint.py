"""Training checkpoints in a run directory, written atomically.

``run_dir/checkpoint/`` holds

* ``weights.safetensors``: named tensors (the trainer stores ``method.*`` and ``ema.*``);
* ``optim.pt``: optimizer ``state_dict``s by phase name (``torch.save``; loaded with ``weights_only=True``);
* ``state.json``: ``{"format": "fewstep-checkpoint", "step": ..., **state}`` (RNG states, config, clock).

A save writes ``checkpoint.tmp/``, moves the current ``checkpoint/`` to ``checkpoint.prev/``, renames the
new one into place and only then removes ``checkpoint.prev/``. If a crash leaves ``checkpoint.prev/`` without
``checkpoint/``, the previous checkpoint is the last good one and is what :func:`load_checkpoint` reads.
"""

from __future__ import annotations

import base64
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from fewstep.errors import CheckpointError
from fewstep.models.io import one_line, replace_folder, sync_folder, tensors_for_file

FORMAT = "fewstep-checkpoint"
WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE = "weights.safetensors", "optim.pt", "state.json"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns; ``folder`` is where it was read from."""

    step: int
    tensors: dict[str, Tensor]
    optimizer_states: dict[str, dict]
    state: dict
    folder: Path


def checkpoint_folder(run_dir: str | Path) -> Path | None:
    """The folder holding ``run_dir``'s last complete checkpoint, or None when there is none."""
    run_dir = Path(run_dir)
    for folder in (run_dir / "checkpoint", run_dir / "checkpoint.prev"):
        if folder.is_dir():
            return folder
    return None


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, Tensor],
                    optimizer_states: dict[str, dict], state: dict) -> Path:
    """Atomically write a checkpoint for ``step`` into ``run_dir/checkpoint`` and return that folder.

    ``state`` must be JSON-serialisable; nothing is replaced if any part fails to write."""
    run_dir = Path(run_dir)
    target = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    text = json.dumps({"format": FORMAT, "step": step, **state}, indent=2)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        safetensors.torch.save_file(tensors_for_file(tensors), tmp / WEIGHTS_FILE)
        torch.save(optimizer_states, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(text + "\n")
        sync_folder(tmp)
        replace_folder(tmp, target, run_dir / "checkpoint.prev")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Read ``run_dir``'s last complete checkpoint; :class:`CheckpointError` if it is missing or corrupt."""
    folder = checkpoint_folder(run_dir)
    if folder is None:
        raise CheckpointError(f"{run_dir} has no checkpoint/ folder to resume from")
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{state_path} is missing or not valid JSON: {one_line(error)}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{state_path} is not a fewstep training checkpoint (format and step missing)")
    try:
        tensors = safetensors.torch.load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} is missing or corrupt: {one_line(error)}") from error
    try:
        optimizer_states = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{folder / OPTIMIZER_FILE} is missing or corrupt: {one_line(error)}") from error
    step = state.pop("step")
    state.pop("format")
    return Checkpoint(step, tensors, optimizer_states, state, folder)


def encode_rng_state(state: Tensor) -> str:
    """A ``torch.Generator.get_state()`` byte tensor as base64 text (for ``state.json``)."""
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def decode_rng_state(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()
