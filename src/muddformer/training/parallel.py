"""Applied from outside the model (architecture, idea 3): distributed setup, activation checkpointing,
torch.compile, DDP and FSDP2, in that order (as torchtitan's parallelize does).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from muddformer.errors import ConfigError
from muddformer.model import MuddModel


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto", parallel: str = "none") -> DistInfo:
    """Join the process group that torchrun describes (WORLD_SIZE etc.); a single process otherwise. FSDP2
    shards over a process group even on one rank, so it needs torchrun's description of one."""
    if parallel == "fsdp" and "RANK" not in os.environ:
        raise ConfigError(
            "--parallel fsdp runs under torchrun: launch with `torchrun --nproc_per_node=N -m muddformer train ...` "
            "(N=1 works), or train one process with --parallel none"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if (world > 1 or parallel == "fsdp") and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world
    return value


def apply_activation_checkpointing(model: MuddModel) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    for block in model.layers:
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward, *args, **kwargs):
    # Only when gradients flow: inference (evaluation, KV-cached sampling) runs the plain forward.
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def apply_compile(model: MuddModel, per_block: bool) -> None:
    """torch.compile in place: the whole model as one graph, or (under FSDP2, whose hooks sit between
    blocks) each block on its own, as torchtitan does."""
    if per_block:
        for block in model.layers:
            # Compile forward only: FSDP2's hooks run around it, outside the graph.
            block.forward = torch.compile(block.forward, fullgraph=True)
    else:
        model.compile(fullgraph=True)


def parallelize(
    model: MuddModel,
    info: DistInfo,
    parallel: str,
    activation_checkpointing: bool,
    compile: bool,
    mixed_precision: torch.dtype | None = None,
) -> nn.Module:
    """Return the module to train: the model with AC / compile applied, wrapped for DDP or sharded by FSDP2."""
    # A compiled checkpoint region may not write module attributes, and the experts keep their router losses on
    # the module: with experts each block is compiled on its own first, and its checkpoint runs around it, eagerly.
    compile_inside_checkpoints = compile and activation_checkpointing and bool(model.experts())
    if compile_inside_checkpoints:
        apply_compile(model, per_block=True)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile and not compile_inside_checkpoints:
        apply_compile(model, per_block=parallel == "fsdp")
    if parallel == "ddp" and info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        mp = (
            MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
            if mixed_precision
            else MixedPrecisionPolicy()
        )
        # The mesh on the run's device: by default FSDP2 would take CUDA whenever there is one, --device cpu or not.
        mesh = init_device_mesh(info.device.type, (info.world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
