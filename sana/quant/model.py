"""W8A8 SANA DiT: int8 linear layers, the blocks that feed them int8, and `quantize_w8a8`.

What is quantized (SANA paper §4): the linear and 1×1-conv layers of the DiT blocks — the
self-attention Q|K|V and output projections, the cross-attention query and output projections,
and Mix-FFN's inverted (1×1, C → 2H) and point (1×1, H → C) convs — with per-output-channel
int8 weights and per-token int8 activations computed on the fly.

What stays in high precision: normalizations, the linear-attention products (ReLU(K)ᵀV and
its product with Q, fp32 as in the float model), the 3×3 depthwise conv (fp32), the embedders
(patch, timestep, guidance, caption) and the final layer. The cross-attention K|V projection
keeps high-precision activations (the caption embeddings, as the paper requires) but by default
stores its weight as int8 (`weight_only`): that halves its memory at the cost of a per-channel
weight rounding, and is what brings the blocks' weight memory under 55% of bf16 (keeping it
in bf16 costs 56.5%; pass it in `keep` for the paper's exact setting).

The fusions: the first linear of each branch (attention Q|K|V, Mix-FFN inverted conv) gets its
int8 input straight from a fused LayerNorm + adaLN-modulate + quantize, and the Mix-FFN point
conv from a fused SiLU + depthwise conv + GLU gate + quantize that reads the inverted conv's
output directly (see `ops.py` for the routes). The depthwise conv stays in fp32 arithmetic inside
that fusion; only its output is quantized.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SanaInputError
from ..dit import MixFFN, SanaBlock, SanaDiT, layer_norm_modulate, residual_layer_norm_modulate
from .ops import (
    QuantizedActivation,
    depthwise_conv_glu_quantize,
    int8_linear,
    layernorm_modulate_quantize,
    quantize_rows,
    quantize_weight,
)

# Module-name patterns (fnmatch, relative to the DiT) never quantized. Everything outside the
# blocks is listed here; inside the blocks only `nn.Linear` layers are candidates anyway, so the
# norms, linear-attention products and depthwise conv need no entry.
DEFAULT_KEEP: tuple[str, ...] = ("x_embedder*", "t_embedder*", "cfg_embedder*", "t_block*", "y_embedder*", "final_layer*")
# Patterns whose weights are int8 but whose activations stay in the model's dtype.
DEFAULT_WEIGHT_ONLY: tuple[str, ...] = ("blocks.*.cross_attn.kv_linear",)


class W8A8Linear(nn.Module):
    """A linear layer with int8 weights `[out, in]` and fp32 per-output-channel scales.

    With `quantize_activations` (W8A8), a float input is quantized per token and multiplied in
    int8 with int32 accumulation; a `QuantizedActivation` input (from a fused producer) is used
    as is. Without it (weight-only), the weight is dequantized to the input's dtype and the
    product runs in that dtype. State-dict keys: `weight` (int8), `weight_scale` (fp32), `bias`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quantize_activations: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantize_activations = quantize_activations
        # Frozen parameters rather than buffers: model managers (ComfyUI's ModelPatcher) move and
        # account for the modules that own parameters, and a bias-free layer would own none.
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, *, quantize_activations: bool = True) -> W8A8Linear:
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            quantize_activations=quantize_activations, dtype=weight.dtype, device=weight.device,
        )
        values, scales = quantize_weight(weight)
        layer.weight.data.copy_(values)
        layer.weight_scale.data.copy_(scales)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def extra_repr(self) -> str:
        mode = "w8a8" if self.quantize_activations else "w8a16 (weight-only)"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            if not self.quantize_activations:
                x = x.dequantize()
            else:
                return int8_linear(x, self.weight, self.weight_scale, self.bias)
        if not self.quantize_activations:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        return int8_linear(quantize_rows(x), self.weight, self.weight_scale, self.bias)


def takes_int8(layer: nn.Module) -> bool:
    """Whether `layer` consumes per-token int8 activations (so its producer may emit them fused)."""
    return isinstance(layer, W8A8Linear) and layer.quantize_activations


class W8A8MixFFN(MixFFN):
    """MixFFN whose middle emits the point conv's int8 input directly (when the point conv is W8A8):
    SiLU, depthwise conv, GLU gate and per-token quantization in one fused operation.

    Same parameters as `MixFFN`; `quantize_w8a8` switches a MixFFN's class to this one.
    """

    def forward(self, x: torch.Tensor | QuantizedActivation, height: int, width: int) -> torch.Tensor:
        if not takes_int8(self.point_conv):
            return super().forward(x, height, width)
        y = self.inverted_conv(x)  # [B, N, 2H], before its SiLU
        gated = depthwise_conv_glu_quantize(y, self.depth_conv.weight, self.depth_conv.bias, height, width)
        return self.point_conv(gated)  # int8 [B, N, H] with per-token scales


class W8A8SanaBlock(SanaBlock):
    """SanaBlock whose LayerNorm + adaLN modulation emits int8 for a W8A8 first layer of each branch.

    Same parameters and arithmetic as `SanaBlock`; a branch whose first layer is not W8A8 (kept
    by `keep`) takes `SanaBlock`'s float route. `quantize_w8a8` switches a SanaBlock's class to this one.
    """

    def forward(self, x, context, t_mod, mask_bias, height, width):
        B, _, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mod.reshape(B, 6, C)
        ).chunk(6, dim=1)  # 6 × [B, 1, C]
        if takes_int8(self.attn.qkv):
            y = layernorm_modulate_quantize(x, shift_msa, scale_msa, self.norm_eps)
        else:
            y = layer_norm_modulate(x, shift_msa, scale_msa, self.norm_eps)
        grad = torch.is_grad_enabled()  # without autograd x is this forward's own buffer: update it in place
        x = torch.addcmul(x, gate_msa, self.attn(y)) if grad else x.addcmul_(gate_msa, self.attn(y))
        cross = self.cross_attn(x, context, mask_bias)
        if takes_int8(self.mlp.inverted_conv):
            x = x + cross if grad else x.add_(cross)
            y = layernorm_modulate_quantize(x, shift_mlp, scale_mlp, self.norm_eps)
        else:
            x, y = residual_layer_norm_modulate(x, cross, shift_mlp, scale_mlp, self.norm_eps)
        mlp_out = self.mlp(y, height, width)
        return torch.addcmul(x, gate_mlp, mlp_out) if grad else x.addcmul_(gate_mlp, mlp_out)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantization_plan(
    model: SanaDiT, keep: Iterable[str] = DEFAULT_KEEP, weight_only: Iterable[str] = DEFAULT_WEIGHT_ONLY
) -> dict[str, bool]:
    """`{linear layer name: quantize_activations}` for every `nn.Linear` that `quantize_w8a8` converts.

    A name matching `keep` stays float; one matching `weight_only` gets int8 weights only.
    """
    keep, weight_only = tuple(keep), tuple(weight_only)
    return {
        name: not _matches(name, weight_only)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _matches(name, keep)
    }


def apply_plan(model: SanaDiT, plan: dict[str, bool], convert) -> SanaDiT:
    """Replace each planned linear layer by `convert(linear, quantize_activations)` and give the
    blocks and Mix-FFNs their int8-emitting forwards. Used by `quantize_w8a8` and the checkpoint loader."""
    for name, quantize_activations in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent.register_module(child, convert(getattr(parent, child), quantize_activations))
    # A class switch, not a rebuild: the subclasses add no state, only the fused routes, so
    # every parameter (and any other reference to these modules) stays as it is.
    for module in model.modules():
        if type(module) is SanaBlock:
            module.__class__ = W8A8SanaBlock
        elif type(module) is MixFFN:
            module.__class__ = W8A8MixFFN
    model.w8a8_plan = dict(plan)
    return model


def quantize_w8a8(
    model: SanaDiT,
    *,
    keep: Iterable[str] = DEFAULT_KEEP,
    weight_only: Iterable[str] = DEFAULT_WEIGHT_ONLY,
    inplace: bool = False,
) -> SanaDiT:
    """The W8A8 version of a SANA DiT (see the module docstring for what is quantized).

    `keep`: fnmatch patterns of module names left in high precision (default: embedders and the
    final layer; add e.g. `"blocks.*.cross_attn.kv_linear"` for the paper's float K/V projection,
    or `"blocks.0.*"` to keep a whole block). `weight_only`: patterns that get int8 weights but
    float activations (default: the cross-attention K/V projection). Weights are quantized on
    the device they are on.

    `inplace=False` (default) leaves `model` untouched and returns a new model that shares no
    tensors with it; `inplace=True` converts `model` itself, layer by layer, so peak memory
    stays near one float model.
    """
    if getattr(model, "w8a8_plan", None) is not None:
        raise SanaInputError("this model is already W8A8-quantized")
    plan = quantization_plan(model, keep, weight_only)
    if not inplace:
        # Copy everything except the weights about to be replaced: those would be copied only to be dropped.
        memo = {}
        for name in plan:
            linear = model.get_submodule(name)
            memo[id(linear)] = linear  # the copy refers to the original layer until it is replaced
        model = copy.deepcopy(model, memo)
    with torch.no_grad():
        return apply_plan(model, plan, lambda linear, act: W8A8Linear.from_float(linear, quantize_activations=act))


def is_w8a8(model: nn.Module) -> bool:
    return getattr(model, "w8a8_plan", None) is not None


def block_weight_bytes(model: SanaDiT) -> int:
    """Bytes of every parameter and buffer of the DiT blocks (meta tensors count by shape)."""
    return sum(t.numel() * t.element_size() for block in model.blocks for t in [*block.parameters(), *block.buffers()])
