"""ReLU linear attention in Triton: forward and backward, for the DiT and the DC-AE.

References (same signatures): `sana.dit.relu_linear_attention` (tokens `[B, N, C]`) and
`sana.dcae.relu_linear_attention_multiscale` (feature map `[B, G·3d, H, W]`). Both reduce to one
computation per (batch, head) on a `[N, D]` view with arbitrary strides:

    S = Σ_n φk_nᵀ v_n  [D, D],   z = Σ_n φk_n  [D]          (φ = ReLU, fp32 accumulation)
    out_n = (φq_n S) / (φq_n · z + eps)

which is the reference's "ones column appended to V" written without the padding: the last
column of (V|1)ᵀK is z. Two passes over the tokens:

1. `_kv_kernel`: each program reduces a slice of the tokens into a partial S and z. Slicing the
   token axis keeps the chip busy when batch·heads is small (4K, batch 1: 70 programs for 132
   SMs otherwise); the partials are summed in a fixed order afterwards, so results are
   deterministic (no atomics).
2. `_attend_kernel`: each program reads its slice of queries once, multiplies by S, divides,
   and writes the output in the input dtype.

q, k and v are read straight from the fused QKV projection (strided views, no copies), and the
output is written in the layout the next op wants (token-major for the DiT and channels-last
DC-AE maps, channel-major for contiguous DC-AE maps).

Backward (same two-pass shape): `_grad_q_kernel` recomputes φq S and the denominator, writes dq
and reduces dS = φqᵀ (g/den) and dz; `_grad_kv_kernel` writes dk = (v dSᵀ + dz)·[k > 0] and
dv = φk dS. All backward arithmetic is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import LINEAR_ATTENTION_EPS
from .launch import cdiv, empty, fp32_dot_precision, interpreting, program_budget

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _kv_kernel(
    K, V, KV_PART, KSUM_PART,
    heads, tokens, dim, tokens_per_split,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // heads
    h = bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, tokens)

    kv = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)  # [d_k, d_v]
    ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < end)[:, None] & mask_d[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_base + rows * stride_kn + offs_d[None, :] * stride_kd, mask=mask, other=0.0)
        v = tl.load(v_base + rows * stride_vn + offs_d[None, :] * stride_vd, mask=mask, other=0.0)
        k = tl.maximum(k.to(tl.float32), 0.0)
        ksum += tl.sum(k, axis=0)
        if UPCAST_DOT:  # Triton's interpreter multiplies bf16 bit patterns as integers; fp32 is exact here too
            kv = tl.dot(tl.trans(k), v.to(tl.float32), kv, input_precision="ieee")
        else:  # 16-bit operands (ReLU is exact in them): exact products, fp32 accumulation on the tensor cores
            kv = tl.dot(tl.trans(k.to(v.dtype)), v, kv, input_precision=DOT_PRECISION)

    part = bh * splits + split
    offs_kv = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(KV_PART + part * BLOCK_D * BLOCK_D + offs_kv, kv)
    tl.store(KSUM_PART + part * BLOCK_D + offs_d, ksum)


@triton.jit
def _attend_kernel(
    Q, KV, KSUM, OUT,
    heads, tokens, dim, tokens_per_split, eps,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    kv = tl.load(KV + bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])
    ksum = tl.load(KSUM + bh * BLOCK_D + offs_d)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, tokens)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < end)[:, None] & mask_d[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        q = tl.load(q_base + rows * stride_qn + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
        q = tl.maximum(q.to(tl.float32), 0.0)
        # S is fp32 and sums over all tokens: keep full fp32 here (the product is tiny next to the loads).
        numerator = tl.dot(q, kv, input_precision="ieee")
        denominator = tl.sum(q * ksum[None, :], axis=1) + eps
        out = numerator / denominator[:, None]
        tl.store(o_base + rows * stride_on + offs_d[None, :] * stride_od, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _grad_q_kernel(
    Q, G, KV, KSUM, DQ, DKV_PART, DKSUM_PART,
    heads, tokens, dim, tokens_per_split, eps,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // heads
    h = bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    kv = tl.load(KV + bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])  # S [d_k, d_v]
    ksum = tl.load(KSUM + bh * BLOCK_D + offs_d)  # z [d_k]
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    g_base = G + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    dq_base = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, tokens)

    dkv = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)  # dS [d_k, d_v]
    dksum = tl.zeros((BLOCK_D,), dtype=tl.float32)  # dz [d_k]
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < end)[:, None] & mask_d[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        q = tl.load(q_base + rows * stride_qn + offs_d[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_base + rows * stride_gn + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        phi_q = tl.maximum(q, 0.0)
        numerator = tl.dot(phi_q, kv, input_precision="ieee")
        denominator = tl.sum(phi_q * ksum[None, :], axis=1) + eps
        g_num = g / denominator[:, None]  # ∂L/∂numerator
        g_den = -tl.sum(g_num * numerator, axis=1) / denominator  # ∂L/∂denominator
        g_phi_q = tl.dot(g_num, tl.trans(kv), input_precision="ieee") + g_den[:, None] * ksum[None, :]
        dq = tl.where(q > 0.0, g_phi_q, 0.0)
        tl.store(dq_base + rows * stride_dqn + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask)
        dkv = tl.dot(tl.trans(phi_q), g_num, dkv, input_precision="ieee")
        dksum += tl.sum(phi_q * g_den[:, None], axis=0)

    part = bh * splits + split
    tl.store(DKV_PART + part * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], dkv)
    tl.store(DKSUM_PART + part * BLOCK_D + offs_d, dksum)


@triton.jit
def _grad_kv_kernel(
    K, V, DKV, DKSUM, DK, DV,
    heads, tokens, dim, tokens_per_split,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    dkv = tl.load(DKV + bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])  # dS [d_k, d_v]
    dksum = tl.load(DKSUM + bh * BLOCK_D + offs_d)  # dz [d_k]
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    dk_base = DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, tokens)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < end)[:, None] & mask_d[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_base + rows * stride_kn + offs_d[None, :] * stride_kd, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + rows * stride_vn + offs_d[None, :] * stride_vd, mask=mask, other=0.0).to(tl.float32)
        g_phi_k = tl.dot(v, tl.trans(dkv), input_precision="ieee") + dksum[None, :]
        dk = tl.where(k > 0.0, g_phi_k, 0.0)
        dv = tl.dot(tl.maximum(k, 0.0), dkv, input_precision="ieee")
        tl.store(dk_base + rows * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(dv_base + rows * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers on [B, heads, N, D] strided views
# --------------------------------------------------------------------------------------------

_BLOCK_N = 64  # tokens per step; 16 is the smallest tile tl.dot takes (used under the interpreter)
_MAX_HEAD_DIM = 128  # S lives in registers: [D, D] fp32


def _blocks(x: torch.Tensor) -> tuple[int, int]:
    block_d = max(16, triton.next_power_of_2(x.shape[-1]))
    block_n = 16 if x.device.type == "cpu" else _BLOCK_N
    return block_n, block_d


def _token_splits(x: torch.Tensor, block_n: int, splits: int | None) -> tuple[int, int]:
    """(splits, tokens per split): enough programs to fill the device, each a whole number of blocks."""
    batch_heads, tokens = x.shape[0] * x.shape[1], x.shape[2]
    if splits is None:
        splits = cdiv(program_budget(x.device), batch_heads)
    splits = max(1, min(splits, cdiv(tokens, block_n)))
    per_split = cdiv(cdiv(tokens, splits), block_n) * block_n
    return cdiv(tokens, per_split), per_split


def _view_out(out: torch.Tensor, token_major: bool) -> torch.Tensor:
    """`out` ([B, N, h, D] or [B, h, D, N]) as the [B, h, N, D] view the kernels index."""
    return out.permute(0, 2, 1, 3) if token_major else out.transpose(-1, -2)


def _empty_like_layout(x: torch.Tensor, token_major: bool, dtype: torch.dtype) -> torch.Tensor:
    B, h, N, D = x.shape
    shape = (B, N, h, D) if token_major else (B, h, D, N)
    return empty(*shape, device=x.device, dtype=dtype)


def attention_forward(q, k, v, eps: float, token_major: bool, splits: int | None = None):
    """q, k, v: [B, h, N, D] views. Returns (out in its layout, S [B·h, D', D'], z [B·h, D'])."""
    B, h, N, D = q.shape
    block_n, block_d = _blocks(q)
    n_splits, per_split = _token_splits(q, block_n, splits)
    kv_part = empty(B * h, n_splits, block_d, block_d, device=q.device, dtype=torch.float32)
    ksum_part = empty(B * h, n_splits, block_d, device=q.device, dtype=torch.float32)
    precision = fp32_dot_precision(k.dtype)
    _kv_kernel[(B * h, n_splits)](
        k, v, kv_part, ksum_part, h, N, D, per_split, *k.stride(), *v.stride(),
        BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision, UPCAST_DOT=interpreting(),
    )
    kv, ksum = kv_part.sum(1), ksum_part.sum(1)  # fixed order: deterministic
    out = _empty_like_layout(q, token_major, q.dtype)
    out4 = _view_out(out, token_major)
    _attend_kernel[(B * h, n_splits)](
        q, kv, ksum, out4, h, N, D, per_split, eps, *q.stride(), *out4.stride(),
        BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out, kv, ksum


def attention_backward(q, k, v, kv, ksum, grad4, eps: float, splits: int | None = None):
    """Gradients (dq, dk, dv) as [B, h, N, D] views, in the inputs' dtypes."""
    B, h, N, D = q.shape
    block_n, block_d = _blocks(q)
    n_splits, per_split = _token_splits(q, block_n, splits)
    dq = _view_out(_empty_like_layout(q, True, q.dtype), True)
    dk = _view_out(_empty_like_layout(k, True, k.dtype), True)
    dv = _view_out(_empty_like_layout(v, True, v.dtype), True)
    dkv_part = empty(B * h, n_splits, block_d, block_d, device=q.device, dtype=torch.float32)
    dksum_part = empty(B * h, n_splits, block_d, device=q.device, dtype=torch.float32)
    _grad_q_kernel[(B * h, n_splits)](
        q, grad4, kv, ksum, dq, dkv_part, dksum_part, h, N, D, per_split, eps,
        *q.stride(), *grad4.stride(), *dq.stride(), BLOCK_N=block_n, BLOCK_D=block_d,
    )
    dkv, dksum = dkv_part.sum(1), dksum_part.sum(1)
    _grad_kv_kernel[(B * h, n_splits)](
        k, v, dkv, dksum, dk, dv, h, N, D, per_split,
        *k.stride(), *v.stride(), *dk.stride(), *dv.stride(), BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return dq, dk, dv


class _ReluLinearAttention(torch.autograd.Function):
    """Autograd around the two passes; saves q, k, v (views of the QKV output) and the small S, z."""

    @staticmethod
    def forward(ctx, q, k, v, eps: float, token_major: bool):
        out, kv, ksum = attention_forward(q, k, v, eps, token_major)
        ctx.save_for_backward(q, k, v, kv, ksum)
        ctx.eps, ctx.token_major = eps, token_major
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, kv, ksum = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, kv, ksum, _view_out(grad_out, ctx.token_major), ctx.eps)
        return dq, dk, dv, None, None


def _supported(*tensors: torch.Tensor) -> bool:
    x = tensors[0]
    return (
        x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
        and 0 < x.shape[-1] <= _MAX_HEAD_DIM
    )


# --------------------------------------------------------------------------------------------
# Public functions (signatures of the references)
# --------------------------------------------------------------------------------------------


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Triton `sana.dit.relu_linear_attention`: [B, N, C] (any row stride, e.g. chunks of the QKV output)."""
    B, N, C = q.shape
    if C % heads or not (q.shape == k.shape == v.shape):
        return NotImplemented
    q4, k4, v4 = (t.unflatten(2, (heads, C // heads)).permute(0, 2, 1, 3) for t in (q, k, v))  # views
    if not _supported(q4, k4, v4):
        return NotImplemented
    out = _ReluLinearAttention.apply(q4, k4, v4, LINEAR_ATTENTION_EPS, True)  # [B, N, h, D]
    return out.view(B, N, C)


def relu_linear_attention_multiscale(qkv: torch.Tensor, head_dim: int, eps: float | None = None) -> torch.Tensor:
    """Triton `sana.dcae.relu_linear_attention_multiscale`: [B, G·3d, H, W] → [B, G·d, H, W].

    Reads q, k, v without copies from NCHW or channels-last maps and returns the same memory format.
    """
    eps = LINEAR_ATTENTION_EPS if eps is None else eps
    B, channels, H, W = qkv.shape
    if channels % (3 * head_dim):
        return NotImplemented
    groups, N = channels // (3 * head_dim), H * W
    channels_last = not qkv.is_contiguous() and qkv.is_contiguous(memory_format=torch.channels_last)
    if channels_last:  # pixel-major: [B, N, G, 3, d]
        grouped = qkv.permute(0, 2, 3, 1).view(B, N, groups, 3, head_dim)
        q4, k4, v4 = (grouped[:, :, :, i].transpose(1, 2) for i in range(3))
    else:  # channel-major: [B, G, 3, d, N]
        grouped = qkv.reshape(B, groups, 3, head_dim, N)
        q4, k4, v4 = (grouped[:, :, i].transpose(-1, -2) for i in range(3))
    if not _supported(q4, k4, v4):
        return NotImplemented
    out = _ReluLinearAttention.apply(q4, k4, v4, float(eps), channels_last)
    if channels_last:  # [B, N, G, d] is the channels-last [B, G·d, H, W]
        return out.view(B, H, W, groups * head_dim).permute(0, 3, 1, 2)
    return out.view(B, groups * head_dim, H, W)  # [B, G, d, N]
