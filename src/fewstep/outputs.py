"""Where fewstep writes. Every command claims its output before any work (:func:`claim`): a new or empty folder, or
one that already holds a fewstep output of the same kind. fewstep never deletes or renames anything it did not
write: replacing an output of its own needs ``overwrite`` (``--overwrite``), except where rerunning into the same
folder means resuming (a run, a benchmark), and temporary and backup siblings carry names only fewstep uses.

An output is recognised by what fewstep put there: a model folder by its ``fewstep.json`` (role ``teacher`` or
``student``), any other folder by the marker file :data:`MARKER` (``{"kind": ..., "files": [...]}``), which
:func:`mark` writes. Replacing an output removes the old folder, so it is refused while the folder holds a file
fewstep did not write there (one a user added).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fewstep.errors import ConfigError

MARKER = ".fewstep-output.json"
MODEL_FILE = "fewstep.json"
MODEL_FILES = (MODEL_FILE, "model.safetensors")
KINDS = ("teacher", "student", "run", "bench", "diffusers", "lora")
RESUMABLE = ("run", "bench")  # rerunning into the same folder continues it
EXPORT_KINDS = {"fewstep": "student", "diffusers": "diffusers", "lora": "lora"}  # the kind each export format writes


def kind_of(folder: Path) -> str | None:
    """The kind of fewstep output ``folder`` holds, or None when fewstep did not write it."""
    for name in (MARKER, MODEL_FILE):
        try:
            description = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(description, dict):
            kind = description.get("kind") if name == MARKER else description.get("role")
            if kind in KINDS:
                return kind
    return None


def claim(path: str | Path, kind: str, overwrite: bool = False) -> Path:
    """Check that fewstep may write an output of ``kind`` at the folder ``path``, before anything is written: it is
    new (its nearest existing parent writable), empty, or holds a fewstep ``kind`` (resumed for a run or a bench,
    replaced only with ``overwrite`` otherwise). Anything else raises one :class:`ConfigError` naming the path."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder: give a folder path for the {kind}")
    if not folder.exists():
        _check_creatable(folder)
        return folder
    entries = sorted(entry.name for entry in folder.iterdir())
    if not entries:
        return folder
    found = kind_of(folder)
    if found is None:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"{folder} holds files fewstep did not write ({shown}): choose a new or empty folder")
    if found != kind:
        raise ConfigError(f"{folder} holds a fewstep {found}, not a {kind}: choose another folder")
    if kind not in RESUMABLE and not overwrite:
        raise ConfigError(f"{folder} already holds a fewstep {kind}: pass --overwrite to replace it, or choose "
                          "another folder")
    foreign = [] if kind in RESUMABLE else sorted(_files(folder) - _written(folder))
    if foreign:
        raise ConfigError(f"{folder} holds files fewstep did not write ({', '.join(foreign[:3])}): move them "
                          "before replacing it")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{folder} is not writable")
    return folder


def claim_file(path: str | Path, suffixes: tuple[str, ...], overwrite: bool = False) -> Path:
    """Check that fewstep may write the file ``path``: one of ``suffixes``, in an existing writable folder, and
    either new or (with ``overwrite``) an existing file to replace."""
    file = Path(path)
    if file.suffix.lower() not in suffixes:
        raise ConfigError(f"{file}: the file must end in {' or '.join(suffixes)}")
    if file.is_dir():
        raise ConfigError(f"{file} is a folder: give a file path ending in {' or '.join(suffixes)}")
    if not file.parent.is_dir():
        raise ConfigError(f"{file}: its folder {file.parent} does not exist")
    if not os.access(file.parent, os.W_OK):
        raise ConfigError(f"{file}: its folder {file.parent} is not writable")
    if file.exists() and not overwrite:
        raise ConfigError(f"{file} exists: pass --overwrite to replace it, or choose another file")
    return file


def mark(folder: Path, kind: str) -> None:
    """Record that ``folder`` holds a fewstep output of ``kind`` and which files fewstep wrote in it (call when it
    is complete; a model folder's ``fewstep.json`` already says what it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(_files(folder) - {MARKER})
    (folder / MARKER).write_text(json.dumps({"kind": kind, "files": files}) + "\n")


def _files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def _written(folder: Path) -> set[str]:
    """The files fewstep wrote in the output ``folder``: a model folder's two, or those its marker lists."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        return {MARKER, *marker.get("files", [])}
    except (OSError, ValueError, AttributeError):
        return set(MODEL_FILES)


def sibling(folder: Path, purpose: str) -> Path:
    """The hidden sibling where fewstep stages (``purpose="tmp"``) or keeps the previous version of
    (``"prev"``) ``folder`` while replacing it: a name only fewstep uses, so removing it removes only its own."""
    return folder.with_name(f".{folder.name}.fewstep-{purpose}")


def _check_creatable(folder: Path) -> None:
    ancestor = folder.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot create {folder}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK):
        raise ConfigError(f"cannot create {folder}: {ancestor} is not writable")
