"""How many CPU threads PyTorch uses while fewstep computes: the cores nobody else is using.

PyTorch's OpenMP threads spin while they wait for each other, so two threads on a 2-core machine whose other core
is busy (another job, a build, a second fewstep run) make every step wait for the slower core: a run slows several
fold. One thread avoids that but gives up the second core when the machine is idle. So while fewstep trains,
evaluates or draws teacher pairs it calls :func:`share_cpu` between steps; at most once a second that reads how much
CPU the *other* processes used since the last look (``/proc/stat`` minus this process's ``/proc/self/stat``) and
sets PyTorch's threads to the cores they left, at least one and at most what PyTorch started with. Two fewstep
runs started together therefore settle on one thread each, and a run takes the machine back when the other ends.

An explicit choice turns this off: ``FEWSTEP_THREADS=N`` (or ``OMP_NUM_THREADS``, which PyTorch itself reads), a
call to ``torch.set_num_threads`` in your program, or a machine without ``/proc``. Results depend on the thread
count in the last bits (float sums in another order), so a run is bitwise reproducible only with a fixed count:
set ``FEWSTEP_THREADS`` where that matters. ``docs/scaling.md`` ("Sharing the CPU") has the measurements.
"""

from __future__ import annotations

import os
import time

import torch

from fewstep.errors import ConfigError

CHECK_EVERY_SECONDS = 1.0


def fixed_threads() -> int | None:
    """The thread count ``FEWSTEP_THREADS`` sets (None when it is not set)."""
    value = os.environ.get("FEWSTEP_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"FEWSTEP_THREADS must be a whole number of threads, at least 1; got {value!r}")
    return int(value)


def threads_for(cores: int, others_busy: float) -> int:
    """Threads for a process allowed ``cores`` when other processes keep ``others_busy`` cores busy: the cores
    they leave, rounded to the nearest whole core, at least one."""
    return max(1, min(cores, int(cores - others_busy + 0.5)))


class _Share:
    """The state of :func:`share_cpu`: the cores this process may use, the last reading, the count last set."""

    def __init__(self):
        self.started = False
        self.enabled = True
        self.initial: int | None = None  # PyTorch's own count, before fewstep changed it
        self.ceiling = 1
        self.cpus: set[str] = set()
        self.last: tuple[float, int, int, int] | None = None  # (time, busy ticks, all ticks, own ticks)
        self.threads = 0

    def start(self) -> None:
        self.started = True
        if self.initial is None:
            self.initial = torch.get_num_threads()
        fixed = fixed_threads()
        if fixed is not None:
            torch.set_num_threads(fixed)
        if fixed is not None or os.environ.get("OMP_NUM_THREADS", "").strip():
            self.enabled = False
            return
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        self.cpus = {f"cpu{index}" for index in allowed}
        self.ceiling = max(1, min(self.initial, len(self.cpus)))
        self.threads = torch.get_num_threads()
        self.last = self.read()
        self.enabled = self.last is not None and self.ceiling > 1

    def read(self) -> tuple[float, int, int, int] | None:
        """Now, the busy and all ticks of the allowed cores, and this process's own ticks (None without /proc)."""
        try:
            busy = total = 0
            with open("/proc/stat") as file:
                for line in file:
                    fields = line.split()
                    if fields and fields[0] in self.cpus:
                        ticks = [int(value) for value in fields[1:]]
                        idle = ticks[3] + ticks[4]  # idle + iowait
                        total += sum(ticks[:8])  # guest time is already inside user time
                        busy += sum(ticks[:8]) - idle
            with open("/proc/self/stat") as file:
                own_fields = file.read().rsplit(")", 1)[1].split()
            own = int(own_fields[11]) + int(own_fields[12])  # utime + stime of all threads
        except (OSError, ValueError, IndexError):
            return None
        return (time.monotonic(), busy, total, own) if total > 0 else None

    def update(self) -> None:
        if torch.get_num_threads() != self.threads:  # the program chose its own count: leave it alone
            self.enabled = False
            return
        now = self.read()
        if now is None:
            self.enabled = False
            return
        _, busy_before, total_before, own_before = self.last
        _, busy, total, own = now
        self.last = now
        if total <= total_before:
            return
        others = len(self.cpus) * max(0, (busy - busy_before) - (own - own_before)) / (total - total_before)
        threads = threads_for(self.ceiling, others)
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads


_share = _Share()


def start_sharing() -> None:
    """(Re)start the policy: apply ``FEWSTEP_THREADS`` (a bad value raises :class:`ConfigError`) or take the first
    reading. A command calls it before any work; :func:`share_cpu` calls it the first time otherwise."""
    _share.start()


def share_cpu() -> None:
    """Between steps of long work: at most once a second, set PyTorch's threads to the cores other processes
    leave idle (see the module docstring). Costs a clock read otherwise."""
    if not _share.started:
        start_sharing()
    elif _share.enabled and time.monotonic() - _share.last[0] >= CHECK_EVERY_SECONDS:
        _share.update()
