"""Sampling speed and peak memory of a sampler call.

Speed is wall-clock seconds per sample of a batched call, the median over repeats after warm-up, with
gradients off and CUDA synchronised before the clock stops. Peak memory on CUDA is exact for tensors
(``torch.cuda.max_memory_allocated`` above what was allocated before the call). On CPU it is approximate:
the growth of the process's peak resident set size during the call (Linux: ``VmHWM`` after resetting it via
``/proc/self/clear_refs``; elsewhere ``getrusage`` ``ru_maxrss``, which only sees growth above the process's
earlier peak). Memory the allocator reuses from earlier calls is not counted, so small calls may read 0.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fewstep.errors import ConfigError, DataError


def time_sampler(fn: Callable[[], Tensor], batch: int, warmup: int = 1, repeats: int = 3) -> float:
    """Seconds per sample of ``fn``, a call that draws one batch of ``batch`` samples.

    ``fn`` runs ``warmup`` times untimed, then ``repeats`` times timed; returns median time / ``batch``."""
    if batch < 1 or warmup < 0 or repeats < 1:
        raise ConfigError(f"timing needs batch >= 1, warmup >= 0, repeats >= 1; got {batch}, {warmup}, {repeats}")
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            _finish(fn(), batch)
        for _ in range(repeats):
            start = time.perf_counter()
            _finish(fn(), batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak memory in bytes that one call of ``fn`` (gradients off) adds on ``device``; see the module notes."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0)
    if _reset_peak_rss():
        before = _proc_status_bytes("VmRSS")
        with torch.no_grad():
            fn()
        return max(_proc_status_bytes("VmHWM") - before, 0)
    before = _max_rss_bytes()
    with torch.no_grad():
        fn()
    return max(_max_rss_bytes() - before, 0)


def _finish(out: Tensor, batch: int) -> None:
    """Check a sampler call returned ``batch`` samples and wait for its device to finish."""
    if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DataError(f"the timed sampler must return a tensor of {batch} samples, got {got}")
    if out.is_cuda:
        torch.cuda.synchronize(out.device)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
