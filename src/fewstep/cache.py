"""Where fewstep keeps things it computes once and reuses (e.g. the digits feature classifier), and how it
writes files so that a crash never leaves half of one behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: ``$FEWSTEP_CACHE`` if set, else ``~/.cache/fewstep``; created on demand."""
    path = Path(os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder, which then
    replaces ``path`` in one step (readable by all, like a normal file). On error nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
