"""RMSNorm and LayerNorm + AdaLN modulate (with the residual add before it) in Triton.

References (same signatures): `sana.dit.rms_norm`, `sana.dit.layer_norm_modulate` and
`sana.dit.residual_layer_norm_modulate`. One program normalises one row of C channels (C ≤
a few thousand: the row stays in registers), reading x once and writing once, where the
reference makes three to five passes. Intermediate roundings of the reference are kept
(LayerNorm's output and `1 + scale` are rounded to the tensor dtype before the modulate, as
`F.layer_norm` and the tensor op `1 + scale` do), so 16-bit results match to the last bit in most
elements; the remaining difference is the order of the fp32 sums.

Forward only: the dispatcher routes calls that need gradients to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty, rows_view

_MAX_CHANNELS = 16384  # one row per program, held in registers


def _row_warps(block_c: int) -> int:
    return 1 if block_c <= 256 else 4 if block_c <= 2048 else 8


@triton.jit
def _rms_norm_kernel(
    X, W, OUT, cols, stride_x, stride_out, eps,
    BLOCK_C: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / cols
    y = x * tl.rsqrt(variance + eps)
    if ROUND_BEFORE_WEIGHT:  # the reference rounds to a 16-bit weight's dtype before scaling
        y = y.to(OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_out + offs, (y * w).to(OUT.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton `sana.dit.rms_norm` over the last dim; x may be a strided view (the QK norms read Q|K|V chunks)."""
    half_weight = weight.dtype in (torch.float16, torch.bfloat16)
    supported = (torch.float32, torch.float16, torch.bfloat16)
    if x.dtype not in supported or weight.dtype not in supported or weight.shape != x.shape[-1:]:
        return NotImplemented
    cols = x.shape[-1]
    rows = rows_view(x)
    if rows is None:
        rows = x.reshape(-1, cols)
    if cols > _MAX_CHANNELS or not weight.is_contiguous():
        return NotImplemented
    out = empty(*x.shape, device=x.device, dtype=weight.dtype if half_weight else torch.float32)
    if rows.shape[0]:
        block_c = triton.next_power_of_2(cols)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, cols, rows.stride(0), cols, eps,
            BLOCK_C=block_c, ROUND_BEFORE_WEIGHT=half_weight, num_warps=_row_warps(block_c),
        )
    return out


@triton.jit
def _layer_norm_modulate_kernel(
    X, UPDATE, X_OUT, SHIFT, SCALE, Y,
    rows_per_batch, cols, stride_x, stride_u, stride_xo, stride_y, stride_shift, stride_scale, eps,
    BLOCK_C: tl.constexpr, HAS_UPDATE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // rows_per_batch
    offs = tl.arange(0, BLOCK_C)
    mask = offs < cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UPDATE:  # the residual add, rounded to x's dtype as the in-place reference add is
        u = tl.load(UPDATE + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
        x_new = (x + u).to(X_OUT.dtype.element_ty)
        tl.store(X_OUT + row * stride_xo + offs, x_new, mask=mask)
        x = x_new.to(tl.float32)
    mean = tl.sum(x, axis=0) / cols
    centered = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / cols
    normed = (centered * tl.rsqrt(variance + eps)).to(Y.dtype.element_ty).to(tl.float32)
    shift = tl.load(SHIFT + b * stride_shift + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scale + offs, mask=mask, other=0.0)
    one_plus_scale = (scale.to(tl.float32) + 1.0).to(SCALE.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + offs, (shift + normed * one_plus_scale).to(Y.dtype.element_ty), mask=mask)


def _modulation_stride(t: torch.Tensor, batch: int, cols: int) -> int | None:
    """Batch stride of a shift/scale `[B or 1, 1, C]` with unit channel stride, or None."""
    if t.ndim != 3 or t.shape[1] != 1 or t.shape[2] != cols or t.shape[0] not in (1, batch) or t.stride(2) != 1:
        return None
    return t.stride(0) if t.shape[0] == batch else 0


def _layer_norm_modulate(x, update, x_out, shift, scale, eps):
    """Launch on x `[B, N, C]`; returns y, or NotImplemented for shapes the kernel does not take."""
    supported = (torch.float32, torch.float16, torch.bfloat16)
    if x.ndim != 3 or x.dtype not in supported or shift.dtype not in supported or scale.dtype not in supported:
        return NotImplemented
    B, N, C = x.shape
    stride_shift, stride_scale = _modulation_stride(shift, B, C), _modulation_stride(scale, B, C)
    rows = rows_view(x)
    updates = rows if update is None else rows_view(update)
    if stride_shift is None or stride_scale is None or rows is None or updates is None or C > _MAX_CHANNELS:
        return NotImplemented
    y = empty(*x.shape, device=x.device, dtype=x.dtype)
    out_rows = rows if x_out is None else x_out.view(-1, C)
    if rows.shape[0]:
        block_c = triton.next_power_of_2(C)
        _layer_norm_modulate_kernel[(rows.shape[0],)](
            rows, updates, out_rows, shift, scale, y,
            N, C, rows.stride(0), updates.stride(0), out_rows.stride(0), C, stride_shift, stride_scale, eps,
            BLOCK_C=block_c, HAS_UPDATE=update is not None, num_warps=_row_warps(block_c),
        )
    return y


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton `sana.dit.layer_norm_modulate`: shift + LN(x)·(1 + scale), x `[B, N, C]`, shift/scale `[B, 1, C]`."""
    return _layer_norm_modulate(x, None, None, shift, scale, eps)


def residual_layer_norm_modulate(
    x: torch.Tensor, update: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `sana.dit.residual_layer_norm_modulate`: (x + update, layer_norm_modulate(x + update)).

    Like the reference, x is updated in place when autograd is off (it is the forward's own buffer).
    """
    if update.shape != x.shape or update.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return NotImplemented
    x_out = x if not torch.is_grad_enabled() and rows_view(x) is not None else empty(*x.shape, device=x.device, dtype=x.dtype)
    y = _layer_norm_modulate(x, update, x_out, shift, scale, eps)
    return NotImplemented if y is NotImplemented else (x_out, y)
