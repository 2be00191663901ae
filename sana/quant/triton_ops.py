"""Triton kernels for W8A8: the int8 GEMM with a fused dequantization epilogue and the fused quantizers.

Each kernel matches its PyTorch reference in `ops.py` (same formula, same rounding rule
`floor(x / s + 0.5)`; results may differ by one int8 step where a division lands on .5 within
float error), which registers it with the dispatcher of `sana.kernels`; this module imports
nothing from `ops.py` (the shared constants live in `sana.kernels.constants`). Wrappers accept an `out=` buffer so tests can poison it and check that every
element is written and nothing outside it.

- `int8_linear`: int8 `[M, K]` × int8 `[N, K]`ᵀ → int32 accumulators in registers, then
  `acc · a_scale[m] · w_scale[n] + bias[n]` and the cast to the output dtype in the epilogue:
  the int32 tile never goes to memory.
- `quantize_rows`: per-row absmax and int8, one program per row (the whole row in registers).
- `depthwise_conv_glu_quantize`: the Mix-FFN's middle from the inverted conv's output `[B, N, 2H]`:
  SiLU as it loads, the 3×3 depthwise conv, `value · silu(gate)` and per-token int8. Neither the
  activation, nor the `[B, N, 2H]` conv output, nor the `[B, N, H]` float product is written. A
  token's scale needs the absmax over all H channels, so each program owns a block of tokens and
  makes two passes over the channels: the first finds the absmax, the second recomputes the conv
  (cheap: the loads hit cache) and writes int8.
- `layernorm_modulate_quantize`: LayerNorm, adaLN `· (1 + scale) + shift` and int8 of a block's
  input, one pass: the modulated float activation is never written.

Row-wise kernels hold a whole row in registers (rows up to `MAX_ROW` elements; SANA's widest
quantized input is the 1600M Mix-FFN's H = 5600). The GEMM is autotuned on GPUs; under
`TRITON_INTERPRET=1` (CPU tests) it runs one small tile configuration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels.constants import INT8_MAX, MIN_ABSMAX
from ..kernels.launch import interpreting
from ..kernels.mix_ffn import depthwise_conv_pair

MAX_ROW = 16384
INTERPRETING = interpreting()  # as triton decided when this module's kernels were defined
MIN_ABSMAX_C = tl.constexpr(MIN_ABSMAX)
INT8_MAX_C = tl.constexpr(float(INT8_MAX))


def _row_launch(length: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row kernel over `length` elements."""
    if length > MAX_ROW:
        raise ValueError(f"rows of {length} elements exceed the row kernels' limit of {MAX_ROW}")
    block = max(triton.next_power_of_2(length), 16)
    return block, min(max(block // 512, 1), 16)


# --------------------------------------------------------------------------------------------
# int8 GEMM with the dequantization + bias epilogue
# --------------------------------------------------------------------------------------------


@triton.jit
def _int8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_am, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: wᵀ tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
        w = tl.load(w_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _gemm_configs() -> list[triton.Config]:
    # Hopper/Ampere int8 tensor-core tiles: K steps of 128 bytes, 3-4 stage pipelines.
    shapes = [
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
        (128, 128, 128, 4, 4),
        (128, 128, 128, 8, 3),
        (64, 128, 128, 4, 4),
        (128, 64, 128, 4, 4),
        (64, 64, 128, 4, 4),
        (32, 64, 128, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


# Keyed on M too: a DiT sees one token count per resolution and batch, so this tunes a handful of times.
_int8_gemm_tuned = triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "HAS_BIAS"])(_int8_gemm_kernel)
_INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def int8_linear(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`int8_linear_reference` as one kernel. a int8 `[M, K]` (row stride free, unit column stride),
    w int8 `[N, K]` contiguous, scales fp32; `out` `[M, N]` with unit column stride, or None."""
    M, K = a.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"int8_linear: activation has K={K}, weight {list(w.shape)}")
    if a.stride(1) != 1:
        a = a.contiguous()
    w = w.contiguous()
    a_scales, w_scales = a_scales.float().contiguous(), w_scales.float().contiguous()
    if out is None:
        out = torch.empty(M, N, device=a.device, dtype=out_dtype)
    elif out.shape != (M, N) or out.stride(1) != 1:
        raise ValueError(f"int8_linear: out must be [{M}, {N}] with unit column stride")
    if M == 0:
        return out
    bias_arg = bias.contiguous() if bias is not None else w_scales  # never read without HAS_BIAS
    args = (a, a_scales, w, w_scales, bias_arg, out, M, N, K, a.stride(0), w.stride(0), out.stride(0))
    if INTERPRETING:
        t = _INTERPRETER_TILE
        grid = (triton.cdiv(M, t["BLOCK_M"]) * triton.cdiv(N, t["BLOCK_N"]),)
        _int8_gemm_kernel[grid](*args, HAS_BIAS=bias is not None, **t)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _int8_gemm_tuned[grid](*args, HAS_BIAS=bias is not None)
    return out


# --------------------------------------------------------------------------------------------
# Row quantizers
# --------------------------------------------------------------------------------------------


@triton.jit
def _quantize_block(y, mask, q_row_ptr, scale_ptr, offs):
    """Per-row int8 of the fp32 row `y` (masked lanes must hold 0): writes values and the scale."""
    absmax = tl.max(tl.abs(y), axis=0)
    scale = tl.maximum(absmax, MIN_ABSMAX_C) / INT8_MAX_C
    q = tl.floor(y / scale + 0.5)
    q = tl.minimum(tl.maximum(q, -INT8_MAX_C), INT8_MAX_C)
    tl.store(q_row_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    y = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    _quantize_block(y, mask, q_ptr + row * stride_q, scale_ptr + row, offs)


@triton.jit
def _depthwise_conv_glu_quantize_kernel(
    y_ptr, w_ptr, bias_ptr, q_ptr, scale_ptr,
    height, width, H, stride_yb, stride_yn, stride_qb, stride_qn,
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < height * width
    row = offs_p // width
    col = offs_p % width
    y_base = y_ptr + b * stride_yb
    absmax = tl.zeros((BLOCK_P,), dtype=tl.float32)
    scale = tl.full((BLOCK_P,), 1.0, dtype=tl.float32)
    for second_pass in tl.static_range(2):  # 0: per-token absmax; 1: int8 with that scale
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            value, gate = depthwise_conv_pair(
                y_base, w_ptr, bias_ptr, row, col, mask_p, offs_h, mask_h, height, width, H, stride_yn,
                BLOCK_P, BLOCK_H, HAS_BIAS, True,
            )
            out = tl.where(mask_h[None, :], value * (gate * tl.sigmoid(gate)), 0.0)
            if second_pass == 0:
                absmax = tl.maximum(absmax, tl.max(tl.abs(out), axis=1))
            else:
                q = tl.floor(out / scale[:, None] + 0.5)
                q = tl.minimum(tl.maximum(q, -INT8_MAX_C), INT8_MAX_C)
                q_ptrs = q_ptr + b * stride_qb + offs_p.to(tl.int64)[:, None] * stride_qn + offs_h[None, :]
                tl.store(q_ptrs, q.to(tl.int8), mask=mask_p[:, None] & mask_h[None, :])
        if second_pass == 0:
            scale = tl.maximum(absmax, MIN_ABSMAX_C) / INT8_MAX_C
            tl.store(scale_ptr + b * (height * width) + offs_p, scale, mask=mask_p)


@triton.jit
def _layernorm_modulate_quantize_kernel(
    x_ptr, shift_ptr, mod_scale_ptr, q_ptr, scale_ptr,
    N, C, stride_x, stride_shift, stride_mod_scale, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row = b · N + token
    batch = row // N
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / C + eps)
    shift = tl.load(shift_ptr + batch * stride_shift + offs, mask=mask, other=0.0).to(tl.float32)
    mod_scale = tl.load(mod_scale_ptr + batch * stride_mod_scale + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(mask, centered * rstd * (1.0 + mod_scale) + shift, 0.0)
    _quantize_block(y, mask, q_ptr + row * C, scale_ptr + row, offs)


def _outputs(rows: int, width: int, device, out: tuple[torch.Tensor, torch.Tensor] | None):
    if out is None:
        return torch.empty(rows, width, device=device, dtype=torch.int8), torch.empty(rows, device=device, dtype=torch.float32)
    values, scales = out
    if values.shape != (rows, width) or values.dtype != torch.int8 or values.stride(1) != 1:
        raise ValueError(f"out values must be int8 [{rows}, {width}] with unit column stride")
    if scales.shape != (rows,) or scales.dtype != torch.float32 or not scales.is_contiguous():
        raise ValueError(f"out scales must be contiguous fp32 [{rows}]")
    return values, scales


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_rows(x: torch.Tensor, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_reference` for x `[M, K]` (any row stride)."""
    x = _unit_columns(x)
    M, K = x.shape
    values, scales = _outputs(M, K, x.device, out)
    if M:
        block, warps = _row_launch(K)
        _quantize_rows_kernel[(M,)](x, values, scales, K, x.stride(0), values.stride(0), BLOCK=block, num_warps=warps)
    return values, scales


def depthwise_conv_glu_quantize(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, height: int, width: int, out=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`depthwise_conv_glu_quantize_reference`: y `[B, h·w, 2H]` (any batch and token stride) →
    int8 `[B, h·w, H]`, scales `[B, h·w]`; `out` is an (int8 `[B·h·w, H]`, fp32 `[B·h·w]`) pair."""
    y = _unit_columns(y)
    B, N, channels = y.shape
    if channels % 2 or N != height * width:
        raise ValueError(f"depthwise_conv_glu_quantize: y {list(y.shape)} is not [B, {height}·{width}, 2H]")
    if weight.shape != (channels, 1, 3, 3) or (bias is not None and bias.shape != (channels,)):
        raise ValueError(f"depthwise_conv_glu_quantize: weight {list(weight.shape)} does not fit {channels} channels")
    H = channels // 2
    values, scales = _outputs(B * N, H, y.device, out)
    if values.numel():
        block_p, block_h = (16, 32) if INTERPRETING else (32, 64)
        grid = (triton.cdiv(N, block_p), B)
        _depthwise_conv_glu_quantize_kernel[grid](
            y, weight.contiguous(), bias if bias is not None else weight, values, scales,
            height, width, H, y.stride(0), y.stride(1), N * values.stride(0), values.stride(0),
            HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_H=block_h, num_warps=4,
        )
    return values.view(B, N, H), scales.view(B, N)


def layernorm_modulate_quantize(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`layernorm_modulate_quantize_reference`: x `[B, N, C]`, shift/scale `[B, C]` or `[B, 1, C]` →
    int8 `[B, N, C]`, scales `[B, N]` (`out`, if given, is the flat pair `[B·N, C]`, `[B·N]`)."""
    B, N, C = x.shape
    x = x.contiguous()  # the block's residual stream is contiguous: no copy in practice
    shift, scale = _unit_columns(shift.reshape(B, C)), _unit_columns(scale.reshape(B, C))
    values, scales = _outputs(B * N, C, x.device, out)
    if out is not None and values.stride(0) != C:
        raise ValueError("layernorm_modulate_quantize: out values must be contiguous")
    if B * N:
        block, warps = _row_launch(C)
        _layernorm_modulate_quantize_kernel[(B * N,)](
            x, shift, scale, values, scales, N, C, C, shift.stride(0), scale.stride(0), float(eps),
            BLOCK=block, num_warps=warps,
        )
    return values.view(B, N, C), scales.view(B, N)
