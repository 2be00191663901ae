"""RMSNorm and LayerNorm + AdaLN modulate (with the residual add before it) in Triton, and the
DC-AE's channel-dim RMSNorm2d with its block's residual add.

References (same signatures): `sana.dit.rms_norm`, `sana.dit.layer_norm_modulate`,
`sana.dit.residual_layer_norm_modulate` and `sana.dcae.rms_norm_2d`. For the DiT norms one program normalises one row of C channels (C ≤
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

from .launch import empty, empty_like, rows_view

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


# --------------------------------------------------------------------------------------------
# DC-AE RMSNorm2d: channel-dim RMS norm of a feature map, with bias and the block's residual add


@triton.jit
def _rms_norm_2d_kernel(
    X, W, BIAS, RES, OUT, channels, pixels, eps,
    stride_xb, stride_xc, stride_xp, stride_rb, stride_rc, stride_rp, stride_ob, stride_oc, stride_op,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < pixels
    x_base = X + b * stride_xb + offs_p.to(tl.int64)[:, None] * stride_xp
    square_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):  # pass 1: the per-pixel mean square over all channels
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_p[:, None] & (offs_c < channels)[None, :]
        x = tl.load(x_base + offs_c.to(tl.int64)[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        square_sum += tl.sum(x * x, axis=1)
    inv_rms = tl.rsqrt(square_sum / channels + eps)
    for c0 in range(0, channels, BLOCK_C):  # pass 2: normalise, affine, residual
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < channels
        mask = mask_p[:, None] & mask_c[None, :]
        x = tl.load(x_base + offs_c.to(tl.int64)[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        normed = (x * inv_rms[:, None]).to(W.dtype.element_ty).to(tl.float32)  # the reference's cast to the weight dtype
        w = tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        bias = tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        y = (normed * w[None, :] + bias[None, :]).to(OUT.dtype.element_ty)
        if HAS_RESIDUAL:  # added in the output dtype, as the reference's `residual + y`
            res_ptrs = RES + b * stride_rb + offs_p.to(tl.int64)[:, None] * stride_rp + offs_c.to(tl.int64)[None, :] * stride_rc
            y = (tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32) + y.to(tl.float32)).to(OUT.dtype.element_ty)
        out_ptrs = OUT + b * stride_ob + offs_p.to(tl.int64)[:, None] * stride_op + offs_c.to(tl.int64)[None, :] * stride_oc
        tl.store(out_ptrs, y, mask=mask)


def _pixel_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(batch, channel, pixel) strides of `[B, C, H, W]` whose H·W pixels form one stride (NCHW or channels-last)."""
    _, _, height, width = t.shape
    if height > 1 and t.stride(2) != width * t.stride(3):
        return None
    return t.stride(0), t.stride(1), t.stride(3)


def rms_norm_2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton `sana.dcae.rms_norm_2d`: x `[B, C, H, W]` (NCHW or channels-last) → same shape, in the
    layout of `residual` if given, else of x.

    Two reads of x (the mean square, then the normalisation) and one write, with the residual
    read in the second pass; the reference makes about six full passes and, for a 16-bit map,
    holds an fp32 copy of it (8.6 GB for the 128-channel stage of a 4096² decode).
    """
    supported = (torch.float32, torch.float16, torch.bfloat16)
    if (
        x.ndim != 4 or x.dtype not in supported or weight.dtype not in supported or bias.dtype != weight.dtype
        or weight.shape != (x.shape[1],) or bias.shape != weight.shape
        or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype))
    ):
        return NotImplemented
    B, C, H, W = x.shape
    # The result takes the residual's layout when there is one (the block input's, as the
    # reference's `residual + ·` does), else x's: channels-last stays channels-last.
    out = empty_like(residual if residual is not None else x)
    strides = [_pixel_strides(t) for t in (x, out, residual if residual is not None else x)]
    if any(s is None for s in strides):
        return NotImplemented
    (sxb, sxc, sxp), (sob, soc, sop), (srb, src, srp) = strides
    if out.numel():
        block_p, block_c = (16, 16) if x.device.type == "cpu" else (64, 32)
        grid = (triton.cdiv(H * W, block_p), B)
        _rms_norm_2d_kernel[grid](
            x, weight.contiguous(), bias.contiguous(), residual if residual is not None else x, out, C, H * W, eps,
            sxb, sxc, sxp, srb, src, srp, sob, soc, sop,
            BLOCK_P=block_p, BLOCK_C=block_c, HAS_RESIDUAL=residual is not None, num_warps=4,
        )
    return out
