"""Mix-FFN middle in Triton: the inverted conv's SiLU, the 3×3 depthwise conv and the GLU gate in one pass.

Reference (same signature): `sana.dit.depthwise_conv_glu`. The input is the inverted conv's
output `[B, N, 2H]`, read as a channels-last `h × w` image. With `input_silu` the SiLU is applied
as each tap is loaded, so the GEMM's activation pass never touches memory: it saves the same
read and write of `[B, N, 2H]` that a SiLU epilogue in the GEMM would, while the GEMM stays
cuBLAS's (zero padding commutes with it, SiLU(0) = 0). Each program computes a tile of
pixels × channels for both halves (value channels c, gate channels H + c), adds the bias, and
writes only `value · SiLU(gate)` `[B, N, H]`: the `[B, N, 2H]` conv output of the reference is
never stored. The reference's roundings (conv output, gate SiLU) to the tensor dtype are kept;
the fused input SiLU stays fp32 where the reference stores it, so 16-bit results differ by the
fp32 summation order and that one rounding.

Forward only: the dispatcher routes calls that need gradients to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty


@triton.jit
def depthwise_conv_pair(
    y_base, W, BIAS, row, col, mask_p, offs_h, mask_h, height, width, hidden, stride_yn,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_SILU: tl.constexpr,
):
    """The 3×3 depthwise conv (padding 1) of a channels-last map at pixels (row, col) for value
    channels `offs_h` and gate channels `hidden + offs_h`: two fp32 `[BLOCK_P, BLOCK_H]` tiles,
    bias added. `INPUT_SILU` applies SiLU to each input as it loads (zero padding commutes with it).
    Shared by this module's kernel and the W8A8 one in `sana.quant.triton_ops`."""
    value = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    gate = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    for tap in tl.static_range(9):  # cross-correlation, padding 1: out[r, c] += w[i, j] · y[r + i − 1, c + j − 1]
        r = row + (tap // 3 - 1)
        c = col + (tap % 3 - 1)
        inside = mask_p & (r >= 0) & (r < height) & (c >= 0) & (c < width)
        ptrs = y_base + (r * width + c).to(tl.int64)[:, None] * stride_yn + offs_h[None, :]
        mask = inside[:, None] & mask_h[None, :]
        w_value = tl.load(W + offs_h * 9 + tap, mask=mask_h, other=0.0).to(tl.float32)
        w_gate = tl.load(W + (offs_h + hidden) * 9 + tap, mask=mask_h, other=0.0).to(tl.float32)
        y_value = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        y_gate = tl.load(ptrs + hidden, mask=mask, other=0.0).to(tl.float32)
        if INPUT_SILU:  # kept in fp32: one rounding fewer than a reference that stores the SiLU output
            y_value = y_value * tl.sigmoid(y_value)
            y_gate = y_gate * tl.sigmoid(y_gate)
        value += y_value * w_value[None, :]
        gate += y_gate * w_gate[None, :]
    if HAS_BIAS:
        value += tl.load(BIAS + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(BIAS + hidden + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    return value, gate


@triton.jit
def _depthwise_conv_glu_kernel(
    Y, W, BIAS, OUT, height, width, hidden, stride_yb, stride_yn, stride_ob, stride_on,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_SILU: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < height * width
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < hidden
    value, gate = depthwise_conv_pair(
        Y + b * stride_yb, W, BIAS, offs_p // width, offs_p % width, mask_p, offs_h, mask_h, height, width, hidden,
        stride_yn, BLOCK_P, BLOCK_H, HAS_BIAS, INPUT_SILU,
    )
    dtype = OUT.dtype.element_ty
    value = value.to(dtype).to(tl.float32)
    gate = gate.to(dtype).to(tl.float32)
    silu_gate = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    out_ptrs = OUT + b * stride_ob + offs_p.to(tl.int64)[:, None] * stride_on + offs_h[None, :]
    tl.store(out_ptrs, (value * silu_gate).to(dtype), mask=mask_p[:, None] & mask_h[None, :])


def depthwise_conv_glu(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    height: int,
    width: int,
    input_silu: bool = False,
) -> torch.Tensor:
    """Triton `sana.dit.depthwise_conv_glu`: y `[B, h·w, 2H]`, weight `[2H, 1, 3, 3]` → `[B, h·w, H]`."""
    B, N, channels = y.shape
    supported = (torch.float32, torch.float16, torch.bfloat16)
    if (
        N != height * width or channels % 2 or y.dtype not in supported or y.stride(2) != 1
        or weight.shape != (channels, 1, 3, 3) or weight.dtype != y.dtype
        or (bias is not None and (bias.shape != (channels,) or bias.dtype != y.dtype))
    ):
        return NotImplemented
    hidden = channels // 2
    weight = weight.contiguous()
    out = empty(B, N, hidden, device=y.device, dtype=y.dtype)
    block_p, block_h = (16, 32) if y.device.type == "cpu" else (32, 64)
    if out.numel():
        grid = (triton.cdiv(N, block_p), triton.cdiv(hidden, block_h), B)
        _depthwise_conv_glu_kernel[grid](
            y, weight, weight if bias is None else bias, out, height, width, hidden,
            y.stride(0), y.stride(1), out.stride(0), out.stride(1),
            BLOCK_P=block_p, BLOCK_H=block_h, HAS_BIAS=bias is not None,
            INPUT_SILU=bool(input_silu), num_warps=4,
        )
    return out
