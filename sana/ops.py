"""Backend choices for the few operations whose fastest PyTorch route depends on the device.

Each function computes exactly what its plain PyTorch counterpart computes (up to float
rounding); only the route differs. `fused` routes the model's fusable pieces (linear
attention, norms + modulate, the Mix-FFN conv + gate) through the dispatcher of
`sana.kernels`: to a Triton kernel on a GPU where it matched its reference there and is the
faster, to the PyTorch reference elsewhere and inside `torch.compile` graphs.
`SANA_KERNELS=auto|triton|torch` (or `use_kernels`, re-exported here) forces either side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import dispatch
from .kernels.dispatch import KERNEL_BACKENDS, KERNELS_ENV, kernel_backend, triton_available, use_kernels

__all__ = ["KERNELS_ENV", "KERNEL_BACKENDS", "Linear", "fused", "kernel_backend", "linear", "triton_available", "use_kernels"]

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
# Fused kernels: routed by the one dispatcher of `sana.kernels`


def fused(reference: Callable) -> Callable:
    """Decorate a PyTorch reference so that calls route to the kernel of the same name in
    `sana.kernels` where the dispatcher allows (`sana.kernels.dispatch`: a kernel that proved
    itself on the device, `SANA_KERNELS`, `use_kernels`), and to the reference otherwise.
    `fn.reference` is the undecorated function."""
    return dispatch.routed(reference)
