"""The hardware a command runs on: devices, CPU threads, and torch.distributed under `torchrun`
(DDP or FSDP wraps; gloo on CPU, NCCL on GPU).

A plain `python -m trainer ...` (no torchrun environment) is a world of one and wraps nothing.
CPU threads default to the CPUs the process may use (its affinity, capped by a container's CPU
quota) shared among the processes of one machine: PyTorch's own default counts the host's
cores, which oversubscribes a container or a machine running several ranks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sana.errors import SanaError, SanaInputError


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


def check_device(device: str) -> None:
    """`SanaInputError` naming `--device` unless it is auto, cpu, cuda, cuda:N or mps, present here."""
    if device in ("auto", "cpu"):
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cuda", "mps"):
        raise SanaInputError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SanaInputError(f"--device {device!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu or auto")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise SanaInputError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SanaInputError(f"--device {device!r}: MPS is not available here; use --device cpu or auto")


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # cgroup v1: quota (-1: none), period beside it


def _cgroup_cpu_quota() -> float | None:
    """The container's CPU quota in CPUs, or None when there is none (or it cannot be read)."""
    try:
        if CGROUP_CPU_MAX.is_file():
            quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if CGROUP_V1_QUOTA.is_file():
            quota = int(CGROUP_V1_QUOTA.read_text())
            period = int((CGROUP_V1_QUOTA.parent / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))
    return max(1, count)


def set_cpu_threads(threads: int = 0) -> int:
    """Set PyTorch's CPU threads and return the number: `threads`, or for 0 `OMP_NUM_THREADS`
    when set (torchrun sets 1), else `usable_cpus()` shared by the processes on this machine."""
    if threads < 0:
        raise SanaInputError(f"--threads {threads}: must be ≥ 0 (0: the CPUs this process may use)")
    if threads == 0:
        if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
            threads = int(os.environ["OMP_NUM_THREADS"])
        else:
            threads = max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(threads)
    return threads


def process_rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0"))


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The device `--device` names (checked by `check_device`); "auto" is the accelerator when
    there is one (CUDA, else MPS), else the CPU. Under torchrun "cuda" is this rank's GPU."""
    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}" if device == "cuda" else device)


def launched_by_torchrun() -> bool:
    return "MASTER_ADDR" in os.environ and "RANK" in os.environ


def init_world(device: str = "auto", *, group_of_one: bool = False) -> World:
    """Join the process group `torchrun` describes (if any) and pick this rank's device.
    `group_of_one`: make the group also for a single process under torchrun (FSDP needs one,
    e.g. to offload a model to the CPU on one GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = pick_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if (size > 1 or (group_of_one and launched_by_torchrun())) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, device=torch_device)


def wrap_model(model: torch.nn.Module, world: World, strategy: str, *, cpu_offload: bool = False) -> torch.nn.Module:
    """DDP (`strategy="ddp"`) or FSDP2 with one shard group per DiT block (`"fsdp"`); unchanged for
    one process, except FSDP in a process group of one (torchrun --nproc_per_node 1).

    FSDP2 (`torch.distributed.fsdp.fully_shard`) shards in place: the module keeps its class
    behaviour and parameter names, its parameters become DTensor shards. It runs on CPU (gloo) too.
    `cpu_offload` keeps the shards, their gradients and the optimizer step in CPU memory (FSDP2's
    `CPUOffloadPolicy`; it needs a CUDA device to compute on).
    """
    if strategy == "fsdp" and (world.distributed or dist.is_initialized()):
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        options = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
        for block in model.blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
        return model
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.device] if world.device.type == "cuda" else None)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor shard (no communication); a plain tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` is: this rank's shard when `like` is a DTensor."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def full_state_dict(wrapped: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """The unsharded state dict (a collective under FSDP: every rank must call it)."""
    if strategy == "fsdp" and is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(wrapped, options=_full_options())
    return unwrap(wrapped).state_dict()


def load_full_state_dict(wrapped: torch.nn.Module, strategy: str, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load whole tensors into the (possibly sharded) model; `strict=False` loads a subset (a LoRA's adapters)."""
    if strategy == "fsdp" and is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(wrapped, state, options=_full_options())
    else:
        unwrap(wrapped).load_state_dict(state, strict=strict)


def optimizer_state_dict(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> dict:
    """The optimizer state with whole tensors (a collective under FSDP), so any world size can resume it."""
    if strategy == "fsdp" and is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, optimizer, options=_full_options())
    return optimizer.state_dict()


def load_optimizer_state_dict(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: str, state: dict) -> None:
    if strategy == "fsdp" and is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, optimizer, state, options=_full_options())
    else:
        optimizer.load_state_dict(state)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def shutdown(timeout_s: float = 300.0) -> None:
    """Leave the process group cleanly (no-op without one); every rank calls it once, at the end.

    A gloo barrier can return on one rank while another still reads its last message: a rank that
    then tears its connections down resets its peer mid-read, which aborted runs in CI. So after
    the barrier every rank checks in on the launcher's store, which does not use those
    connections, and nobody destroys the group until all ranks have.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    store, size = dist.distributed_c10d._get_default_store(), dist.get_world_size()
    store.add("trainer_shutdown", 1)
    deadline = time.monotonic() + timeout_s
    while store.add("trainer_shutdown", 0) < size:
        if time.monotonic() > deadline:
            raise SanaError(f"shutdown: not every one of the {size} ranks reached the end within {timeout_s:.0f} s")
        time.sleep(0.01)
    dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_ranks_agree(flag: bool, world: World) -> bool:
    """True only when `flag` is true on every rank (a collective: every rank must call it), so
    that a decision such as skipping a step is taken by all ranks or by none."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return value
