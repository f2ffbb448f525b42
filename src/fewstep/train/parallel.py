"""Multi-process training: which process this is, gradient averaging, agreement between processes, and a
local launcher.

Why the trainer averages gradients itself instead of wrapping networks in DDP: a method computes its losses
through ``method.losses()``, calling several networks (a student, a frozen teacher, a target network, a fake
score) in phases that each update a different subset of parameters. DDP synchronises only through the
``forward()`` of the module it wraps, so every method would have to route each trainable call through a
wrapper (and DDP would need ``find_unused_parameters`` for the parameters a phase does not touch). Instead,
after the backward pass of a phase update the trainer averages that phase's gradients over all processes with
one ``all_reduce(AVG)`` per dtype (:func:`average_gradients`). The result is what DDP computes (DDP averages
gradients too); what is given up is overlapping communication with the backward pass, which does not matter
at fewstep's model sizes. Because every process then applies the same averaged gradient to the same weights
with the same optimizer, all replicas stay identical, so one copy (rank 0's) is the whole training state.

Processes are started by ``accelerate launch``/``torchrun`` (which set ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) or by :func:`launch`; accelerate then creates the process group (gloo on
CPU, NCCL on GPU) when the trainer builds its ``Accelerator``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from fewstep.errors import ConfigError, FewstepError


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Replace each gradient by its mean over all processes (parameters without a gradient are skipped; every
    process runs the same code, so they agree on which those are)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.AVG)
        for grad, value in zip(group, flat.split([g.numel() for g in group]), strict=True):
            grad.copy_(value.view_as(grad))


def local(tensor: Tensor) -> Tensor:
    """This process's part of ``tensor`` (the tensor itself when it is not sharded, see
    :mod:`fewstep.train.sharding`)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def average(values: Tensor) -> Tensor:
    """The mean of ``values`` over all processes (each process passes the same shape)."""
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.AVG)
    return values


def total(value: int, device: torch.device) -> int:
    """The sum of an integer over all processes."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return int(tensor.item())


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process (stop decisions that depend on a clock must agree)."""
    tensor = torch.tensor([float(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def gather(obj) -> list:
    """``obj`` from every process, in rank order (JSON-like objects only)."""
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(function: Callable, args: tuple, num_processes: int) -> None:
    """Run ``function(*args)`` in ``num_processes`` new local processes that form one process group (what
    ``accelerate launch --num_processes N`` does). ``function`` must be importable (defined at module level).
    A :class:`FewstepError` in a process is printed there and ends that process with status 2."""
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    try:
        mp.start_processes(_worker, args=(function, args, num_processes, free_port()), nprocs=num_processes,
                           start_method="spawn")
    except mp.ProcessExitedException as error:
        raise FewstepError(f"training process {error.error_index} exited with status {error.exit_code} "
                           f"(its error is printed above)") from None


def _worker(rank: int, function: Callable, args: tuple, num_processes: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_processes),
                      LOCAL_WORLD_SIZE=str(num_processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        function(*args)
    except FewstepError as error:
        print(f"fewstep: error (process {rank}): {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
