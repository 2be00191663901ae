"""Small launch helpers shared by the kernels."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_budget(device: torch.device) -> int:
    """How many programs a token-sliced reduction should launch: two per SM on a GPU.

    On CPU (the interpreter, tests only) a small number that still splits small inputs, so
    the split-and-sum path is exercised.
    """
    if device.type == "cuda":
        return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 16


def fp32_dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` precision: full fp32 for fp32 operands (the references are fp32, not tf32);
    16-bit operands are exact in any mode."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def rows_view(x: torch.Tensor) -> torch.Tensor | None:
    """x `[..., C]` as a 2-D `[R, C]` view with unit channel stride, or None if no such view exists."""
    if x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


# Tests set this (through `poisoned_outputs`) so that every buffer a kernel should fill starts
# as NaN: an element a kernel fails to write then shows up instead of passing as stale memory.
_poison = False


def empty(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty` for kernel outputs and workspaces (NaN-filled while poisoning is on)."""
    out = torch.empty(shape, device=device, dtype=dtype)
    return out.fill_(float("nan")) if _poison else out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like` (same memory format) for kernel outputs, NaN-filled while poisoning is on."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if _poison else out


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous
