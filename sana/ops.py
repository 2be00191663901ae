"""Backend choices for the few operations whose fastest PyTorch route depends on the device.

Each function computes exactly what its plain PyTorch counterpart computes (up to float
rounding); only the route differs. `fused` routes the model's fusable pieces (linear
attention, norms + modulate, the Mix-FFN conv + gate) to the Triton kernels of `sana.kernels`
on CUDA, and to their PyTorch references elsewhere and inside `torch.compile` graphs;
`SANA_KERNELS=auto|triton|torch` forces either.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import SanaInputError

# Below this many rows the GEMM is too small for the route to matter.
_CONV_ROUTE_MIN_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x `[..., in]`, weight `[out, in]`.

    On CPU in fp32 it runs as a 1×1 convolution over a channels-last view of the rows: oneDNN's
    convolution kernels beat the BLAS GEMM behind `F.linear` by about 2× on the CPUs measured
    (AMD EPYC, see docs/BENCHMARKS.md), and both views are free — the channels-last output is
    the row-major `[..., out]` tensor itself.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() < _CONV_ROUTE_MIN_ROWS * x.shape[-1]:
        return F.linear(x, weight, bias)
    rows = x.reshape(1, -1, 1, x.shape[-1]).permute(0, 3, 1, 2)  # [1, in, R, 1], channels-last
    out = F.conv2d(rows, weight[:, :, None, None], bias)  # [1, out, R, 1], channels-last
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys) whose forward takes the fastest route."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------
# Fused kernels: Triton on CUDA, the PyTorch reference elsewhere
# --------------------------------------------------------------------------------------------

KERNELS_ENV = "SANA_KERNELS"
KERNEL_BACKENDS = ("auto", "triton", "torch")


def _backend_from_env() -> str:
    backend = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if backend not in KERNEL_BACKENDS:
        raise SanaInputError(f"{KERNELS_ENV}={backend!r}: expected one of {', '.join(KERNEL_BACKENDS)}")
    return backend


# Read once at import, not per call: a compiled graph then depends on one module global only.
_kernel_backend = _backend_from_env()
_triton_importable: bool | None = None
_triton_functions: dict[str, Callable] = {}


def kernel_backend() -> str:
    """"auto" (Triton for CUDA tensors when triton imports), "triton" (always) or "torch" (never)."""
    return _kernel_backend


@contextmanager
def use_kernels(backend: str) -> Iterator[None]:
    """Route the fused functions as `SANA_KERNELS=backend` would, within the block.

    "triton" also routes CPU tensors to Triton, which runs them only under `TRITON_INTERPRET=1`
    (the tests do this).
    """
    global _kernel_backend
    if backend not in KERNEL_BACKENDS:
        raise SanaInputError(f"unknown kernel backend {backend!r}: expected one of {', '.join(KERNEL_BACKENDS)}")
    previous, _kernel_backend = _kernel_backend, backend
    try:
        yield
    finally:
        _kernel_backend = previous


def triton_available() -> bool:
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_importable = True
        except Exception:  # ImportError, or a broken install failing at import
            _triton_importable = False
    return _triton_importable


def _routes_to_triton(name: str, tensors: list[torch.Tensor]) -> bool:
    if _kernel_backend == "torch" or not tensors:
        return False
    if torch.compiler.is_compiling():
        return False  # inside a compiled graph the compiler fuses the reference itself
    if name not in kernels.DIFFERENTIABLE and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # forward-only kernel: training runs the reference
    if _kernel_backend == "auto":
        return all(t.is_cuda for t in tensors) and triton_available()
    if not triton_available():
        raise RuntimeError(f"{KERNELS_ENV}=triton, but triton does not import")
    if any(t.device.type == "cpu" for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{KERNELS_ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 (tests only)")
    return True


def fused(reference: Callable) -> Callable:
    """Decorate a PyTorch reference so that calls route to the Triton function of the same name
    in `sana.kernels` when the backend says so (see `use_kernels`), and to the reference otherwise
    or when the Triton function declines the inputs. `fn.reference` is the undecorated function."""
    name = reference.__name__
    if name not in kernels.__all__:
        raise SanaInputError(f"sana.kernels has no Triton function {name!r}")

    @functools.wraps(reference)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if _routes_to_triton(name, tensors):
            if name not in _triton_functions:
                _triton_functions[name] = getattr(kernels, name)
            out = _triton_functions[name](*args, **kwargs)
            if out is not NotImplemented:
                return out
        return reference(*args, **kwargs)

    dispatch.reference = reference
    return dispatch
