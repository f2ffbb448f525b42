"""Fully sharded training (``train.distributed=fsdp``): every network's weights, gradients and optimizer
state split over the processes, with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

What is sharded: the backbone of every denoiser the method owns (student, target and EMA networks, fake
score, PD's previous-round student), each known block (fewstep's residual blocks, a diffusers network's UNet
and transformer blocks: :func:`shard_units`) as its own unit and the rest of the backbone as one more,
all on one mesh over all processes. The frozen teacher (``method.teacher``) is not: it is the caller's object,
which evaluation and later runs use on one process, and sharding happens in place; each process keeps it
whole (``train.teacher_dtype=bfloat16`` halves it). Networks of the same
architecture are therefore sharded alike (each process holds the same rows of every weight), so the
element-wise updates methods make between networks (a target EMA ``lerp_`` of the student, PD's teacher
taking the student's weights) and the trainer's EMA act on local shards with no communication. A forward pass
gathers a unit's weights and frees them afterwards; the backward pass reduce-scatters (averages) gradients,
so the trainer averages only the parameters left unsharded (for example sCM's log-variance head).

Checkpoints do not depend on sharding: :func:`full_state` gathers every sharded tensor before rank 0 writes
the same files as an unsharded run, and :func:`shard_like` / :func:`shard_optimizer_state` split loaded full
tensors to this process's shards, so a run resumes under any process count, sharded or not.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from fewstep.train.memory import CHECKPOINTABLE_BLOCKS

DIFFUSERS_BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def backbones(method: nn.Module) -> list[nn.Module]:
    """The backbone networks with parameters inside ``method`` but outside its teacher (each once)."""
    teacher = getattr(method, "teacher", None)
    teachers = {id(module) for module in teacher.modules()} if isinstance(teacher, nn.Module) else set()
    found: dict[int, nn.Module] = {}
    for module in method.modules():
        backbone = getattr(module, "backbone", None)
        if (isinstance(backbone, nn.Module) and id(backbone) not in teachers
                and any(True for _ in backbone.parameters())):
            found.setdefault(id(backbone), backbone)
    return list(found.values())


def shard_networks(method: nn.Module, device: torch.device, world: int) -> list[FSDPModule]:
    """Shard every backbone of ``method`` over ``world`` processes in place and return them. Call after the
    method is on ``device`` and before optimizers or EMAs are made from its parameters."""
    mesh = init_device_mesh(device.type, (world,))
    networks = backbones(method)
    for backbone in reversed(networks):  # inner networks before any network that contains them
        for block in shard_units(backbone):
            if not isinstance(block, FSDPModule):
                fully_shard(block, mesh=mesh)
        fully_shard(backbone, mesh=mesh)
    return networks


def shard_units(backbone: nn.Module) -> list[nn.Module]:
    """The blocks of ``backbone`` sharded as units of their own (the rest is one more unit): fewstep's residual
    blocks, and a diffusers network's UNet down / mid / up blocks and transformer blocks, so a forward pass gathers
    one block's weights at a time."""
    units = [block for block in backbone.modules() if isinstance(block, CHECKPOINTABLE_BLOCKS)]
    model = getattr(backbone, "model", None)
    if model is not None and hasattr(model, "config"):  # a diffusers network (fewstep.nets.diffusers_backbone)
        for name in DIFFUSERS_BLOCK_LISTS:
            units += list(getattr(model, name, None) or ())
        if getattr(model, "mid_block", None) is not None:
            units.append(model.mid_block)
    return units


def reshard(networks: list[FSDPModule]) -> None:
    """Free the gathered weights of ``networks``. FSDP keeps a root network's weights gathered after its
    forward pass (for the backward pass that usually follows); a network run without gradients (a target,
    the teacher) would stay gathered, and methods' element-wise updates between networks need shards."""
    for network in networks:
        network.reshard()


def full_state(state: dict) -> dict:
    """``state`` with every sharded tensor gathered in full (a collective: every process must call it)."""
    return {key: value.full_tensor() if isinstance(value, DTensor) else value for key, value in state.items()}


def shard_like(full: dict[str, Tensor], current: dict) -> dict[str, Tensor]:
    """Full tensors split like the entries of ``current`` that are sharded (the others unchanged)."""
    return {key: _shard_as(value, current.get(key)) for key, value in full.items()}


def _shard_as(value: Tensor, like) -> Tensor:
    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)
    return value


def full_optimizer_state(state: dict) -> dict:
    """An optimizer ``state_dict`` with its sharded per-parameter tensors gathered (collective)."""
    return {**state, "state": {index: full_state(entry) for index, entry in state["state"].items()}}


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer ``state_dict`` with each per-parameter tensor of a parameter's shape split like that
    (sharded) parameter, ready for ``optimizer.load_state_dict``."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, entry in state["state"].items():
        parameter = parameters[int(index)] if int(index) < len(parameters) else None
        sharded[index] = {key: _shard_as(value, parameter)
                          if isinstance(value, Tensor) and parameter is not None and value.shape == parameter.shape
                          else value for key, value in entry.items()}
    return {**state, "state": sharded}
