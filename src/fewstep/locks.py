"""Folder locks: one process at a time writes a run directory.

:func:`lock_folder` creates ``folder/.lock`` atomically (``O_CREAT | O_EXCL``) holding JSON
``{"pid", "host", "started", "what"}`` and removes it on leaving, also on an exception or KeyboardInterrupt.
While the file exists, another :func:`lock_folder` on the folder raises :class:`ConfigError` naming its holder.

A process killed outright (SIGKILL, power loss) leaves its lock behind. A lock whose process is gone (same host,
``os.kill(pid, 0)`` finds no such process) is taken over, with a ``UserWarning`` through :func:`warnings.warn`
(so a caller can filter it and a test can catch it; Python prints it on stderr by default). A lock from another host is
never taken over, since its process cannot be checked from here: the error says to delete the file once that run
is gone. A dead holder's pid reused by an unrelated process makes its lock look alive; the error names the pid
to check. POSIX only: on Windows ``os.kill(pid, 0)`` would end the process.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path

from fewstep.errors import ConfigError

LOCK_FILE = ".lock"
_TRIES = 3  # attempts to create the lock, each after taking over a dead holder's


@contextmanager
def lock_folder(folder: Path, what: str) -> Iterator[Path]:
    """Hold ``folder/.lock`` (the folder is created if missing) for the ``with`` block; yields the lock's path.
    ``what`` says what holds it (shown to a process that finds the folder in use)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.now().astimezone().isoformat(timespec="seconds"), "what": what})
    _acquire(lock, mine)
    try:
        yield lock
    finally:
        with suppress(FileNotFoundError):
            if lock.read_text() == mine:  # removed or taken over by hand meanwhile: not ours to delete
                lock.unlink()


def _acquire(lock: Path, mine: str) -> None:
    for _ in range(_TRIES):
        try:
            descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            seen = _read(lock)
            if seen is None:  # released meanwhile
                continue
            text, holder = seen
            if _alive(holder):
                raise ConfigError(_in_use(lock, holder)) from None
            warnings.warn(f"{lock.parent}: taking over the lock of process {holder['pid']}, which is no longer "
                          f"running ({holder['what']}, started {holder['started']})", stacklevel=2)
            _remove_stale(lock, text)
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(mine)
        return
    raise ConfigError(f"{lock.parent}: other processes keep taking its lock {lock}: try again once they are done")


def _read(lock: Path) -> tuple[str, dict] | None:
    """The lock's text and content, or None when it is gone; waits briefly for a holder still writing it."""
    for attempt in range(5):
        try:
            text = lock.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = None
        if (isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder["pid"] > 0
                and {"host", "started", "what"} <= holder.keys()):
            return text, holder
        time.sleep(0.05 * (attempt + 1))
    raise ConfigError(f"{lock} is not a fewstep lock file: delete it if no process is using {lock.parent}")


def _alive(holder: dict) -> bool:
    """Whether the lock's process may still run: always for another host's, whose processes cannot be seen."""
    if holder["host"] != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _in_use(lock: Path, holder: dict) -> str:
    remedy = "wait for it to finish or choose another folder"
    if holder["host"] != socket.gethostname():
        remedy += f" (or delete {lock} if that process is gone)"
    return (f"{lock.parent} is in use by process {holder['pid']} on {holder['host']} since {holder['started']} "
            f"({holder['what']}): {remedy}")


def _remove_stale(lock: Path, seen: str) -> None:
    """Remove a dead holder's lock, unless another process replaced it since it was read as ``seen`` (two
    processes taking over the same stale lock at once): then that process's lock is put back."""
    aside = lock.with_name(f"{LOCK_FILE}.{os.getpid()}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if aside.read_text() != seen:
        with suppress(FileExistsError):
            os.link(aside, lock)
    aside.unlink()
