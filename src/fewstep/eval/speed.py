"""Sampling speed and peak memory of a sampler call.

Speed is wall-clock seconds per sample of a batched call, the median over repeats after warm-up, with
gradients off and CUDA synchronised before the clock stops. Peak memory is the most tensor memory the call
holds at once beyond what existed before it. On CUDA that is ``torch.cuda.max_memory_allocated`` above the
allocation before the call. On CPU every tensor storage an operator creates during the call is counted from
its creation until it is freed (a ``TorchDispatchMode``), so the figure is exact for tensors and does not
depend on the allocator or on the process's resident set, whose counters the kernel keeps only
approximately. Scratch buffers an operator frees before returning are not seen on CPU.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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
    """Peak tensor memory in bytes that one call of ``fn`` (gradients off) adds on ``device``; see the module notes."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0)
    counter = _CPUTensorMemory()
    with torch.no_grad(), counter:
        fn()
    return counter.peak


class _CPUTensorMemory(TorchDispatchMode):
    """Counts the bytes of CPU tensor storages created inside the mode while they are alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor) and leaf.device.type == "cpu":
                self._track(leaf.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)


def _finish(out: Tensor, batch: int) -> None:
    """Check a sampler call returned ``batch`` samples and wait for its device to finish."""
    if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DataError(f"the timed sampler must return a tensor of {batch} samples, got {got}")
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
