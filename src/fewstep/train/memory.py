"""Memory: gradient checkpointing, a frozen teacher in a lower precision, and the per-network memory plan.

* :func:`enable_gradient_checkpointing` recomputes each residual block of fewstep's backbones (MLP
  ``ResidualBlock``, SmallUNet ``ConvBlock``) in the backward pass instead of storing its activations
  (``torch.utils.checkpoint``, non-reentrant). Blocks run normally when no gradient is being recorded.
  A diffusers model gets its own switch (``enable_gradient_checkpointing()``).
* :func:`set_teacher_dtype` stores the frozen teacher's weights in ``bfloat16``/``float16`` and runs it under
  autocast in that dtype, returning float32 (the input's dtype) to the method.
* :func:`memory_plan` reports, per network of the method (its top-level submodules: student, teacher, target
  network, fake score, ...), the bytes this process holds of parameters, buffers, gradients and optimizer
  state (its shards under FSDP), and the
  process's measured peak (``torch.cuda.max_memory_allocated`` on GPU, the peak resident set size on CPU).

Both switches patch ``forward`` on the module instances (a ``functools.partial`` of the class's ``forward``),
so parameter names, state dicts and checkpoints are unchanged.
"""

from __future__ import annotations

import functools
import resource
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fewstep.errors import ConfigError
from fewstep.nets.mlp import ResidualBlock
from fewstep.nets.unet import ConvBlock
from fewstep.train.parallel import local

CHECKPOINTABLE_BLOCKS = (ResidualBlock, ConvBlock)
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _checkpointed_forward(forward, block: nn.Module, *args):
    if torch.is_grad_enabled():
        return checkpoint(forward, block, *args, use_reentrant=False)
    return forward(block, *args)


def enable_gradient_checkpointing(method: nn.Module) -> int:
    """Checkpoint every known residual block inside ``method``, and switch on diffusers models' own gradient
    checkpointing; returns how many blocks and models. Raises :class:`ConfigError` when there are none (a
    backbone fewstep does not know how to checkpoint)."""
    blocks = [m for m in method.modules() if isinstance(m, CHECKPOINTABLE_BLOCKS)]
    diffusers_models = [m for m in method.modules() if getattr(m, "_supports_gradient_checkpointing", False)
                        and callable(getattr(m, "enable_gradient_checkpointing", None))]
    if not blocks and not diffusers_models:
        raise ConfigError(f"train.gradient_checkpointing: {type(method).__name__}'s networks have no blocks "
                          f"fewstep can checkpoint (supported: the mlp and unet backbones, and diffusers models "
                          f"that support it); set it to false")
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, type(block).forward, block)
    for model in diffusers_models:
        model.enable_gradient_checkpointing()
    return len(blocks) + len(diffusers_models)


def _forward_in_dtype(forward, module: nn.Module, dtype: torch.dtype, x: torch.Tensor, *args, **kwargs):
    with torch.autocast(x.device.type, dtype=dtype):
        return forward(module, x, *args, **kwargs).to(x.dtype)


def set_teacher_dtype(method: nn.Module, name: str) -> None:
    """Store ``method.teacher``'s weights in dtype ``name`` (a key of :data:`TEACHER_DTYPES`) without gradients
    and run it under autocast in that dtype. ``"float32"`` leaves the teacher as it is."""
    if name not in TEACHER_DTYPES:
        raise ConfigError(f"train.teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got {name!r}")
    if name == "float32":
        return
    teacher = getattr(method, "teacher", None)
    if not isinstance(teacher, nn.Module) or not any(True for _ in teacher.parameters()):
        raise ConfigError(f"train.teacher_dtype={name} needs a network teacher; {type(method).__name__} has "
                          f"{'an analytic teacher' if isinstance(teacher, nn.Module) else 'no teacher'} "
                          f"(use float32)")
    dtype = TEACHER_DTYPES[name]
    teacher.requires_grad_(False).to(dtype)
    teacher.forward = functools.partial(_forward_in_dtype, type(teacher).forward, teacher, dtype)


def _bytes(tensors) -> int:
    """Bytes this process holds of ``tensors`` (its shards, under FSDP)."""
    return sum(local(t).numel() * t.element_size() for t in tensors)


def peak_bytes(device: torch.device) -> int:
    """The process's peak memory: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_plan(method: nn.Module, trainable: list[nn.Parameter], optimizers: dict[str, torch.optim.Optimizer],
                device: torch.device) -> dict:
    """Bytes per network (top-level submodule of ``method``; parameters shared between networks count for the
    first) and in total, plus the measured ``peak_bytes``. Gradients count every trainable parameter (a phase
    update holds them); optimizer state is what the optimizers hold now (call after the first update)."""
    trainable_ids = {id(p) for p in trainable}
    states = {id(p): state for opt in optimizers.values() for p, state in opt.state.items()}
    seen: set[int] = set()
    networks = {}
    for name, module in method.named_children():
        params = [p for p in module.parameters() if id(p) not in seen]
        seen |= {id(p) for p in params}
        buffers = list(module.buffers())
        if not params and not buffers:
            continue
        grads = [p for p in params if id(p) in trainable_ids]
        optimizer_state = [v for p in params for v in states.get(id(p), {}).values()
                           if isinstance(v, torch.Tensor)]
        entry = {"parameters": _bytes(params), "buffers": _bytes(buffers), "gradients": _bytes(grads),
                 "optimizer_state": _bytes(optimizer_state),
                 "dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
                 "trainable": bool(grads)}
        entry["total"] = entry["parameters"] + entry["buffers"] + entry["gradients"] + entry["optimizer_state"]
        networks[name] = entry
    return {"networks": networks, "total": sum(n["total"] for n in networks.values()),
            "peak_bytes": peak_bytes(device), "peak_kind": "cuda_max_memory_allocated" if device.type == "cuda"
            else "process_peak_rss"}


def format_plan(plan: dict) -> str:
    """One line: each network's total, the sum, and the measured peak, in MiB."""
    mib = 2**20
    parts = [f"{name} {entry['total'] / mib:.2f}" for name, entry in plan["networks"].items()]
    return (f"memory (MiB): {', '.join(parts)}; networks total {plan['total'] / mib:.2f}; "
            f"peak {plan['peak_bytes'] / mib:.1f} ({plan['peak_kind']})")
