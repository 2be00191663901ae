"""W8A8 operations: the PyTorch references (also the CPU route) and the routing to Triton.

Quantization scheme (SANA paper §4): symmetric int8 with no zero point, weights per output
channel, activations per token (row), computed on the fly. A row `x` becomes
`values = clamp(floor(x / s + 0.5), -127, 127)` with `s = max(|x|) / 127`; -128 is never used,
so negating a quantized tensor stays exact.

Every function here has one definition in PyTorch (`*_reference`) that the Triton kernels in
`triton_ops.py` must match. The kernels are registered below with the one dispatcher of
`sana.kernels` (probe inputs and tolerances next to each), and `int8_linear`, `quantize_rows`,
`depthwise_conv_glu_quantize` and `layernorm_modulate_quantize` route through it exactly as the
model's other fused kernels do (`sana.kernels.dispatch`): under `auto` (default) a kernel runs
on a GPU only after it matched its reference there and timed faster; `SANA_KERNELS=triton|torch`
(or `sana.ops.use_kernels`) forces either side; `torch.compile` traces and calls that need
gradients take the reference.

The PyTorch int8 GEMM is `torch._int_mm` (exact int32 accumulation; on CPU it is about 2× faster
than the fp32 GEMM on the AMD EPYC measured), with a dequantized fp32 matmul where `_int_mm` is
refused (CUDA shapes it does not support).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..dit import depthwise_conv_glu
from ..kernels import dispatch
from ..kernels.constants import INT8_MAX, MIN_ABSMAX
from ..kernels.dispatch import KernelSpec, ProbeInputs
from ..kernels.tolerance import ElementwiseClose, QuantizedMatch


@dataclass(frozen=True)
class QuantizedActivation:
    """Per-token int8 activations: `values` int8 `[..., K]`, `scales` fp32 `[...]` (one per row).

    `dtype` is the float dtype the producer would have emitted, which is also the dtype a
    W8A8 linear layer returns for it. `shape` is the shape of the float tensor it stands for, so
    modules that only read `x.shape` / `x.dtype` accept it in place of that tensor.
    """

    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dequantize(self) -> torch.Tensor:
        return (self.values.float() * self.scales[..., None]).to(self.dtype)


# --------------------------------------------------------------------------------------------
# References (PyTorch) — the definitions the kernels match
# --------------------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: weight `[out, in]` → (int8 `[out, in]`, fp32 scales `[out]`)."""
    values, scales = quantize_rows_reference(weight)
    return values, scales


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of `x [..., K]` → (int8 `[..., K]`, fp32 scales `[...]`)."""
    xf = x.float()
    scales = xf.abs().amax(dim=-1).clamp_min(MIN_ABSMAX) / INT8_MAX
    values = torch.floor(xf / scales[..., None] + 0.5).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scales


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 `a [M, K] @ w [N, K]ᵀ` for int8 operands, exact (through `torch._int_mm` where it applies)."""
    if a.device.type == "cpu" or (a.shape[0] > 16 and a.shape[1] % 8 == 0 and w.shape[0] % 8 == 0):
        try:
            return torch._int_mm(a.contiguous(), w.t())
        except RuntimeError:
            pass  # a backend without this int8 GEMM: fall through
    # fp32 sums of int8 products are exact up to 2^24 and within 1 ulp beyond: this route is a
    # fallback for odd shapes, not a bit-exact one.
    return (a.float() @ w.float().t()).round().to(torch.int32)


def int8_linear_reference(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`(a @ wᵀ) · a_scales[:, None] · w_scales[None, :] + bias` in fp32, then `out_dtype`.

    a int8 `[M, K]`, a_scales fp32 `[M]`, w int8 `[N, K]`, w_scales fp32 `[N]`, bias `[N]` or None.
    """
    out = int8_matmul(a, w).float()
    out.mul_(a_scales.float()[:, None]).mul_(w_scales.float()[None, :])
    if bias is not None:
        out.add_(bias.float())
    return out.to(out_dtype)


def depthwise_conv_glu_quantize_reference(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix-FFN's middle then per-token int8, all in fp32: y `[B, h·w, 2H]` (the inverted conv's
    output, before its SiLU) → SiLU, 3×3 depthwise conv (padding 1, weight `[2H, 1, 3, 3]`),
    `value · silu(gate)` of the two channel halves → (int8 `[B, h·w, H]`, fp32 scales `[B, h·w]`).

    Nothing is rounded to y's dtype on the way (the fused kernel keeps every step in registers).
    """
    # The float model's reference on fp32 copies (the SiLU makes a fresh tensor, which the
    # reference may overwrite in place; the caller's y is never touched).
    gated = depthwise_conv_glu.reference(torch.nn.functional.silu(y.float()), weight.float(),
                                         None if bias is None else bias.float(), height, width)
    return quantize_rows_reference(gated)


def layernorm_modulate_quantize_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """adaLN then per-row int8: `LN(x) · (1 + scale) + shift` (LayerNorm without affine, fp32).

    x `[B, N, C]`; shift, scale `[B, C]` or `[B, 1, C]` → (int8 `[B, N, C]`, fp32 scales `[B, N]`).
    """
    B, _, C = x.shape
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    normed = (xf - mean) * torch.rsqrt(var + eps)
    y = normed * (1 + scale.float().reshape(B, 1, C)) + shift.float().reshape(B, 1, C)
    return quantize_rows_reference(y)


# --------------------------------------------------------------------------------------------
# The kernels' registrations: probe inputs (the tests' shapes: tiny, odd, strided) and tolerances

# The int8 GEMM's fp32 epilogue may fuse its multiply and add (one rounding fewer than the
# reference): a few fp32 ulps, or one ulp of a 16-bit output, plus that much of the largest.
INT8_LINEAR_TOLERANCE = ElementwiseClose(
    rtol={torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}, atol_of_max=1e-6
)
# int8 values equal but one step on at most 1 in 500 (a division landing on .5 within float error).
QUANTIZED_TOLERANCE = QuantizedMatch()


def _int8_linear_probe(make: ProbeInputs) -> dict[str, Any]:
    M, K, N = 37, 53, 29
    # Scales of a quantized layer's size (absmax / 127): the products stay within fp16's range.
    scales = {name: make.positive(name, rows, scale=1e-3, dtype=torch.float32) for name, rows in (("a_scales", M), ("w_scales", N))}
    return {"a": make.int8(M, K), "w": make.int8(N, K), **scales, "bias": make.randn("bias", N), "out_dtype": make.dtype}


def _quantize_rows_probe(make: ProbeInputs) -> dict[str, Any]:
    x = make.randn("x", 19, 64 + 45, scale=3.0)[:, :45]  # strided rows, K = 45
    x[4] = 0  # an all-zero row
    return {"x": x}


def _depthwise_conv_glu_quantize_probe(make: ProbeInputs) -> dict[str, Any]:
    B, H, h, w = 2, 37, 3, 5
    return {"y": make.randn("y", B, h * w, 2 * H + 6, scale=2.0)[..., : 2 * H],
            "weight": make.randn("weight", 2 * H, 1, 3, 3, scale=1 / 3), "bias": make.randn("bias", 2 * H),
            "height": h, "width": w}


def _layernorm_modulate_quantize_probe(make: ProbeInputs) -> dict[str, Any]:
    B, N, C = 2, 7, 45
    return {"x": make.randn("x", B, N, C, scale=2.0, offset=0.5), "shift": make.randn("shift", B, 6, C)[:, 3:4],
            "scale": make.randn("scale", B, 6, C)[:, 4:5], "eps": 1e-6}


def _triton_op(name: str) -> Callable[[], Callable]:
    def load() -> Callable:
        # Imported at the kernel's first probe or forced call: importing triton costs a second,
        # and TRITON_INTERPRET is read when the kernels are defined.
        return getattr(importlib.import_module(".triton_ops", __package__), name)

    return load


for _name, _probe, _tolerance in (
    ("int8_linear", _int8_linear_probe, INT8_LINEAR_TOLERANCE),
    ("quantize_rows", _quantize_rows_probe, QUANTIZED_TOLERANCE),
    ("depthwise_conv_glu_quantize", _depthwise_conv_glu_quantize_probe, QUANTIZED_TOLERANCE),
    ("layernorm_modulate_quantize", _layernorm_modulate_quantize_probe, QUANTIZED_TOLERANCE),
):
    dispatch.register(KernelSpec(name=_name, load=_triton_op(_name), probe=_probe, tolerance=_tolerance))

_int8_linear = dispatch.routed(int8_linear_reference, "int8_linear")
_quantize_rows = dispatch.routed(quantize_rows_reference, "quantize_rows")
_depthwise_conv_glu_quantize = dispatch.routed(depthwise_conv_glu_quantize_reference, "depthwise_conv_glu_quantize")
_layernorm_modulate_quantize = dispatch.routed(layernorm_modulate_quantize_reference, "layernorm_modulate_quantize")


# --------------------------------------------------------------------------------------------
# Routed entry points


def quantize_rows(x: torch.Tensor) -> QuantizedActivation:
    """Dynamic per-token int8 of `x [..., K]`."""
    values, scales = _quantize_rows(x.reshape(-1, x.shape[-1]))
    return QuantizedActivation(values.view(x.shape), scales.view(x.shape[:-1]), x.dtype)


def int8_linear(
    act: QuantizedActivation, weight: torch.Tensor, weight_scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The W8A8 linear layer: `act [..., K]` against int8 `weight [N, K]` → `[..., N]` in `act.dtype`."""
    K = act.shape[-1]
    a, a_scales = act.values.reshape(-1, K), act.scales.reshape(-1)
    out = _int8_linear(a, a_scales, weight, weight_scales, bias, act.dtype)
    return out.view(*act.shape[:-1], weight.shape[0])


def depthwise_conv_glu_quantize(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, height: int, width: int
) -> QuantizedActivation:
    """Fused SiLU + depthwise conv + GLU gate + per-token int8 (see the reference): the Mix-FFN's
    point conv input straight from the inverted conv's output y `[B, h·w, 2H]`."""
    values, scales = _depthwise_conv_glu_quantize(y, weight, bias, height, width)
    return QuantizedActivation(values, scales, y.dtype)


def layernorm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> QuantizedActivation:
    """Fused LayerNorm + adaLN modulation + per-token int8 (see the reference); x `[B, N, C]`."""
    values, scales = _layernorm_modulate_quantize(x, shift, scale, eps)
    return QuantizedActivation(values, scales, x.dtype)
