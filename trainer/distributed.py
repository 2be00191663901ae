"""torch.distributed setup: `torchrun` launches, DDP or FSDP wraps; gloo on CPU, NCCL on GPU.

A plain `python -m trainer ...` (no torchrun environment) is a world of one and wraps nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str = "auto") -> World:
    """Join the process group `torchrun` describes (if any) and pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, device=torch_device)


def wrap_model(model: torch.nn.Module, world: World, strategy: str) -> torch.nn.Module:
    """DDP (`strategy="ddp"`) or FSDP with one unit per DiT block (`"fsdp"`); unchanged for one process."""
    if not world.distributed:
        return model
    if strategy == "fsdp":
        from functools import partial

        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        from sana.dit import SanaBlock

        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=partial(transformer_auto_wrap_policy, transformer_layer_cls={SanaBlock}),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            device_id=world.device if world.device.type == "cuda" else None,
            use_orig_params=True,  # keeps parameter names, so LoRA/EMA/optimizer see the usual names
        )
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.device] if world.device.type == "cuda" else None)


def full_state_dict(wrapped: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """The unsharded state dict (collective under FSDP: every rank must call it)."""
    if strategy == "fsdp" and isinstance(wrapped, torch.nn.Module) and type(wrapped).__name__ == "FullyShardedDataParallel":
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        with FullyShardedDataParallel.state_dict_type(
            wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
        ):
            return wrapped.state_dict()
    return unwrap(wrapped).state_dict()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return value
