"""How many CPU threads PyTorch uses in a fewstep command.

PyTorch's OpenMP threads spin while they wait for each other, so two threads on a machine whose other core is
busy (another job, a build, a second fewstep run) make every step wait for the slower core: the run slows several
fold. The policy: use the cores that are idle when the command starts (measured over a short window from
``/proc/stat``; the load average lags by a minute), at least one. An explicit choice wins: ``FEWSTEP_THREADS``, or
``OMP_NUM_THREADS`` (which PyTorch itself reads). ``docs/scaling.md`` has the measurements behind it.
"""

from __future__ import annotations

import math
import os
import time

import torch

WINDOW_SECONDS = 0.25


def idle_cores(window: float = WINDOW_SECONDS) -> float | None:
    """How many of the machine's cores were idle over the next ``window`` seconds (None where ``/proc/stat`` is
    not there to read)."""
    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat") as file:
            fields = [int(value) for value in file.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy_before, total_before = busy_and_total()
        time.sleep(window)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError, IndexError):
        return None
    total = total_after - total_before
    cores = os.cpu_count() or 1
    return cores if total <= 0 else cores * (1 - (busy_after - busy_before) / total)


def choose_threads() -> int:
    """The threads a command should use: ``FEWSTEP_THREADS``; else ``OMP_NUM_THREADS`` if set; else the idle cores
    now (rounded, at least one; all cores where that cannot be measured)."""
    for name in ("FEWSTEP_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    idle = idle_cores()
    cores = os.cpu_count() or 1
    return cores if idle is None else max(1, min(cores, math.floor(idle + 0.5)))


def apply_thread_policy() -> int:
    """Set PyTorch's intra-op threads by :func:`choose_threads`; returns the number."""
    threads = choose_threads()
    torch.set_num_threads(threads)
    return threads
