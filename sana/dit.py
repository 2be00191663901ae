"""SANA Linear DiT: one class for Sana 600M/1600M (512–4K), SANA-1.5 and SANA-Sprint.

Parameter names follow the official NVlabs checkpoints (`blocks.{i}.attn.qkv`, ...), so the
fused projections stay fused: one GEMM for Q|K|V and one for the cross-attention K|V. The
only differences from the official layout are that 1×1 convolutions are stored as 2-D
linear weights (`mlp.inverted_conv.weight` is `[2H, C]`, not `.conv.weight` `[2H, C, 1, 1]`);
`sana/dit_io.py` maps both official and diffusers layouts onto these names.

Numerics follow diffusers' `SanaTransformer2DModel` (the project's reference): linear
attention in fp32, caption and QK RMSNorm computed in fp32 then rounded to the weight dtype,
the cross-attention key mask as an additive −10000 bias, and the ±65504 clip in fp16.

Shapes: B batch, C hidden size, N = h·w latent tokens, L caption tokens, H = int(mlp_ratio·C).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import SanaCheckpointError, SanaInputError
from .kernels.constants import LINEAR_ATTENTION_EPS  # shared with the Triton kernel
from .ops import Linear, fused

# LINEAR_ATTENTION_EPS, the linear-attention denominator epsilon: diffusers uses 1e-15 (NVlabs
# passes 1e-8). Only an all-zero query or key row feels it, and then the output is 0 either way.
# Diffusers turns the 0/1 caption mask into this additive bias (NVlabs does the same without xformers).
CROSS_ATTENTION_MASK_BIAS = -10000.0

# The flow shift each release was trained with, which the samplers use unless told otherwise:
# 3.0, and 6.0 for the 4K model, the one variant whose latent side (`sample_size`) is 128.
DEFAULT_FLOW_SHIFT = 3.0
FLOW_SHIFT_4K = 6.0
SAMPLE_SIZE_4K = 128


def default_flow_shift(sample_size: int) -> float:
    """The flow shift a SANA release with this `sample_size` was trained with: 3.0 for the
    512/1024/2048 models, 6.0 for the 4K model. A config's `flow_shift` starts from it."""
    return FLOW_SHIFT_4K if sample_size >= SAMPLE_SIZE_4K else DEFAULT_FLOW_SHIFT


@dataclass(frozen=True)
class SanaDiTConfig:
    """Everything that shapes a SANA DiT. Presets for every release are in `DIT_PRESETS`."""

    hidden_size: int = 1152
    depth: int = 28
    attention_head_dim: int = 32  # linear self-attention; heads = hidden_size // 32
    cross_attention_heads: int = 16
    cross_attention_head_dim: int = 72
    caption_channels: int = 2304  # Gemma-2-2B hidden size
    in_channels: int = 32
    out_channels: int = 32
    patch_size: int = 1
    mlp_ratio: float = 2.5
    sample_size: int = 32  # latent side at the training resolution (1024px / 32)
    interpolation_scale: float | None = None  # None: no positional embedding (NoPE)
    qk_norm: bool = False  # SANA-1.5 and Sprint: RMSNorm over all heads on Q and K
    guidance_embeds: bool = False  # SANA-Sprint: embedded guidance
    guidance_embeds_scale: float = 0.1
    timestep_scale: float = 1.0  # pipelines multiply the timestep by this (Sprint teacher: 0.001)
    norm_eps: float = 1e-6
    flow_shift: float = DEFAULT_FLOW_SHIFT  # the samplers' shift for this model (the one owner of it)
    variant: str = "custom"

    def __post_init__(self) -> None:
        if self.hidden_size % self.attention_head_dim:
            raise SanaInputError(
                f"hidden_size {self.hidden_size} is not a multiple of attention_head_dim {self.attention_head_dim}"
            )
        if self.cross_attention_heads * self.cross_attention_head_dim != self.hidden_size:
            raise SanaInputError(
                f"cross attention {self.cross_attention_heads}×{self.cross_attention_head_dim} "
                f"does not span hidden_size {self.hidden_size}"
            )

    @property
    def num_attention_heads(self) -> int:
        return self.hidden_size // self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)

    def replace(self, **changes: Any) -> SanaDiTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SanaDiTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SanaInputError(f"unknown SanaDiTConfig fields: {unknown}")
        return cls(**d)


_SANA_600M = dict(hidden_size=1152, depth=28, cross_attention_heads=16, cross_attention_head_dim=72)
_SANA_1600M = dict(hidden_size=2240, depth=20, cross_attention_heads=20, cross_attention_head_dim=112)

DIT_PRESETS: dict[str, SanaDiTConfig] = {
    "sana-600m-512": SanaDiTConfig(**_SANA_600M, sample_size=16),
    "sana-600m-1024": SanaDiTConfig(**_SANA_600M, sample_size=32),
    "sana-1600m-512": SanaDiTConfig(**_SANA_1600M, sample_size=16),
    "sana-1600m-1024": SanaDiTConfig(**_SANA_1600M, sample_size=32),
    "sana-1600m-2k": SanaDiTConfig(**_SANA_1600M, sample_size=64, interpolation_scale=1.0),
    "sana-1600m-4k": SanaDiTConfig(**_SANA_1600M, sample_size=SAMPLE_SIZE_4K, interpolation_scale=2.0, flow_shift=FLOW_SHIFT_4K),
    "sana1.5-1.6b": SanaDiTConfig(**_SANA_1600M, qk_norm=True),
    "sana1.5-4.8b": SanaDiTConfig(**{**_SANA_1600M, "depth": 60}, qk_norm=True),
    "sana-sprint-0.6b": SanaDiTConfig(**_SANA_600M, qk_norm=True, guidance_embeds=True),
    "sana-sprint-1.6b": SanaDiTConfig(**_SANA_1600M, qk_norm=True, guidance_embeds=True),
}
DIT_PRESETS = {name: cfg.replace(variant=name) for name, cfg in DIT_PRESETS.items()}


def variant_name(config: SanaDiTConfig) -> str:
    """The release a config matches, or "custom"."""
    for name, preset in DIT_PRESETS.items():
        if preset.replace(variant=config.variant, flow_shift=config.flow_shift) == config:
            return name
    return "custom"


# --------------------------------------------------------------------------------------------
# Functional pieces (each the PyTorch reference a fused kernel must match)
#
# `@fused` routes a call to the Triton kernel of the same name in `sana.kernels` on a GPU where
# that kernel matched this reference and is faster (see `sana.ops.fused`, `SANA_KERNELS`); on
# CPU the body below runs unchanged.
# --------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] → [B, dim] fp32, cos first (diffusers `Timesteps(flip_sin_to_cos=True, shift=0)`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(
    dim: int, height: int, width: int, base_size: int, interpolation_scale: float, device: torch.device | None = None
) -> torch.Tensor:
    """[h·w, dim] fp32 table; the first half encodes the column (x), the second the row (y).

    Positions always span [0, base_size / interpolation_scale) whatever the aspect ratio.
    The angles are float64, which Apple's MPS lacks: there the table is built on the CPU and moved.
    """
    target = torch.device(device) if device is not None else None
    if target is not None and target.type == "mps":
        device = torch.device("cpu")
    rows = torch.arange(height, dtype=torch.float32, device=device) / (height / base_size) / interpolation_scale
    cols = torch.arange(width, dtype=torch.float32, device=device) / (width / base_size) / interpolation_scale
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")

    def sincos_1d(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = torch.arange(d // 2, dtype=torch.float64, device=device) / (d / 2.0)
        omega = 1.0 / 10000**omega
        angles = torch.outer(pos.reshape(-1).double(), omega)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    table = torch.cat([sincos_1d(dim // 2, grid_x), sincos_1d(dim // 2, grid_y)], dim=1).float()
    return table if target is None else table.to(target)


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: statistics in fp32, rounded to a half weight's dtype before the scale."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


@fused
def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """ReLU linear attention, `out_i = Σ_j (φq_i·φk_j) v_j / (Σ_j φq_i·φk_j + eps)` per head.

    q, k, v: [B, N, C] (channel c = head·D + d) in any dtype → [B, N, C] in q's dtype.
    Accumulation is fp32: sums over N tokens overflow fp16 at 1K and beyond.
    A ones column appended to V yields the denominator from the same two matmuls.
    """
    B, N, C = q.shape
    D = C // heads
    dtype = q.dtype
    q = F.relu(q).float().view(B, N, heads, D).transpose(1, 2)  # [B, h, N, D]
    k = F.relu(k).float().view(B, N, heads, D).transpose(1, 2)  # [B, h, N, D]
    v = F.pad(v.float().view(B, N, heads, D), (0, 1), value=1.0).transpose(1, 2)  # [B, h, N, D+1]
    kv = torch.matmul(k.transpose(-1, -2), v)  # [B, h, D, D+1]
    out = torch.matmul(q, kv)  # [B, h, N, D+1]
    out = out[..., :D] / (out[..., D:] + LINEAR_ATTENTION_EPS)
    return out.transpose(1, 2).reshape(B, N, C).to(dtype)


@fused
def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """AdaLN modulate: `shift + LayerNorm(x)·(1 + scale)` in x's dtype; x `[B, N, C]`, shift/scale `[B, 1, C]`."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale).to(x.dtype)


@fused
def residual_layer_norm_modulate(
    x: torch.Tensor, update: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x + update, layer_norm_modulate(x + update, ...))`: a residual add and the next norm.

    Without autograd, x is updated in place (callers pass their own buffer) and returned.
    """
    x = x + update if torch.is_grad_enabled() else x.add_(update)
    return x, layer_norm_modulate(x, shift, scale, eps)


@fused
def depthwise_conv_glu(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    height: int,
    width: int,
    input_silu: bool = False,
) -> torch.Tensor:
    """Mix-FFN middle: 3×3 depthwise conv (padding 1) over y `[B, h·w, 2H]` read as a channels-last
    image, then the GLU gate `value · SiLU(gate)` of its two channel halves → `[B, h·w, H]`.
    `input_silu` applies SiLU to y first (the inverted conv's activation)."""
    B, N, channels = y.shape
    inplace = not torch.is_grad_enabled()  # no autograd graph: reuse the big buffers
    if input_silu:
        y = F.silu(y, inplace=inplace)
    image = y.view(B, height, width, channels).permute(0, 3, 1, 2)  # [B, 2H, h, w], channels-last strides
    image = F.conv2d(image, weight, bias, padding=1, groups=channels)  # stays channels-last
    value, gate = image.chunk(2, dim=1)  # 2 × [B, H, h, w]
    out = value.mul_(F.silu(gate, inplace=True)) if inplace else value * F.silu(gate)
    return out.permute(0, 2, 3, 1).reshape(B, N, -1)  # [B, N, H], a view when channels-last


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class TimestepEmbedder(nn.Module):
    """Sinusoid(256) → Linear → SiLU → Linear. Used for the timestep and Sprint's guidance."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class CaptionProjection(nn.Module):
    """caption_channels → C → C with tanh-GELU between (a timm Mlp in the official code)."""

    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.fc1 = Linear(caption_channels, hidden_size)
        self.fc2 = Linear(hidden_size, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = CaptionProjection(caption_channels, hidden_size)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # [B, C, h, w] → [B, N, C]


class LinearSelfAttention(nn.Module):
    """ReLU linear attention with fused Q|K|V, optional QK RMSNorm across heads (eps 1e-5)."""

    def __init__(self, hidden_size: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(hidden_size, 3 * hidden_size, bias=False)
        self.q_norm = RMSNorm(hidden_size, eps=1e-5) if qk_norm else None
        self.k_norm = RMSNorm(hidden_size, eps=1e-5) if qk_norm else None
        self.proj = Linear(hidden_size, hidden_size)
        # Batch rows whose attention is replaced by identity attention, proj(V): PAG's perturbed
        # branch. Set only through `perturbed_self_attention`, which restores it on exit.
        self.identity_rows: slice | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 × [B, N, C]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = relu_linear_attention(q, k, v, self.heads).to(x.dtype)
        if self.identity_rows is not None:
            out = out.clone()
            out[self.identity_rows] = v[self.identity_rows]
        out = self.proj(out)
        if x.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class CrossAttention(nn.Module):
    """Softmax attention from image tokens to caption tokens, fused K|V projection."""

    def __init__(self, hidden_size: int, heads: int, head_dim: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_linear = Linear(hidden_size, hidden_size)
        self.kv_linear = Linear(hidden_size, 2 * hidden_size)
        # diffusers' rms_norm_across_heads uses eps 1e-5 here (NVlabs: 1e-6); we follow diffusers.
        self.q_norm = RMSNorm(hidden_size, eps=1e-5) if qk_norm else None
        self.k_norm = RMSNorm(hidden_size, eps=1e-5) if qk_norm else None
        self.proj = Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q_linear(x)
        k, v = self.kv_linear(context).chunk(2, dim=-1)  # 2 × [B, L, C]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, N, self.heads, self.head_dim).transpose(1, 2)  # [B, h, N, d]
        k = k.view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, h, L, d]
        v = v.view(B, -1, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)  # mask_bias: [B, 1, 1, L]
        return self.proj(out.transpose(1, 2).reshape(B, N, C).to(q.dtype))


class MixFFN(nn.Module):
    """GLUMBConv: 1×1 conv + SiLU, 3×3 depthwise conv, GLU gate (value | gate halves), 1×1 conv.

    The 1×1 convs run as GEMMs on the token layout; the depthwise conv reads the same memory
    as a channels-last image, so no layout copy is made between them.
    """

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.inverted_conv = Linear(hidden_size, 2 * mlp_hidden)
        self.depth_conv = nn.Conv2d(2 * mlp_hidden, 2 * mlp_hidden, 3, padding=1, groups=2 * mlp_hidden)
        self.point_conv = Linear(mlp_hidden, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        y = self.inverted_conv(x)  # [B, N, 2H], before its SiLU (the conv kernel applies it)
        y = depthwise_conv_glu(y, self.depth_conv.weight, self.depth_conv.bias, height, width, input_silu=True)
        return self.point_conv(y)  # y: [B, N, H]


class SanaBlock(nn.Module):
    """AdaLN-single block: x += g·LinearAttn(mod(LN x)); x += CrossAttn(x, y); x += g·MixFFN(mod(LN x))."""

    def __init__(self, config: SanaDiTConfig):
        super().__init__()
        C = config.hidden_size
        self.norm_eps = config.norm_eps
        self.attn = LinearSelfAttention(C, config.num_attention_heads, config.qk_norm)
        self.cross_attn = CrossAttention(C, config.cross_attention_heads, config.cross_attention_head_dim, config.qk_norm)
        self.mlp = MixFFN(C, config.mlp_hidden)
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)

    def forward(
        self,
        x: torch.Tensor,  # [B, N, C]
        context: torch.Tensor,  # [B, L, C]
        t_mod: torch.Tensor,  # [B, 6C]
        mask_bias: torch.Tensor | None,  # [B, 1, 1, L]
        height: int,
        width: int,
    ) -> torch.Tensor:
        B, _, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mod.reshape(B, 6, C)
        ).chunk(6, dim=1)  # 6 × [B, 1, C]
        y = layer_norm_modulate(x, shift_msa, scale_msa, self.norm_eps)
        # Without autograd x is this forward's own buffer: update it in place.
        x = torch.addcmul(x, gate_msa, self.attn(y)) if torch.is_grad_enabled() else x.addcmul_(gate_msa, self.attn(y))
        x, y = residual_layer_norm_modulate(x, self.cross_attn(x, context, mask_bias), shift_mlp, scale_mlp, self.norm_eps)
        mlp_out = self.mlp(y, height, width)
        return torch.addcmul(x, gate_mlp, mlp_out) if torch.is_grad_enabled() else x.addcmul_(gate_mlp, mlp_out)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.linear = Linear(hidden_size, out_features)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # 2 × [B, 1, C]
        return self.linear(layer_norm_modulate(x, shift, scale, self.eps))


class DiTInputs(nn.Module):
    """The input side shared by `SanaDiT` and `sana.controlnet.SanaControlNet`, which own the same
    modules under the same names (so both load the same checkpoint keys): the patch embedding
    (plus the sincos table of 2K/4K models), the timestep (and Sprint guidance) embedding with its
    AdaLN projection `t_block`, and the caption projection with its RMSNorm. Also the block call
    with optional gradient checkpointing, and the dtype/device of the weights."""

    def __init__(self, config: SanaDiTConfig):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.x_embedder = PatchEmbed(config.in_channels, C, config.patch_size)
        self.t_embedder = TimestepEmbedder(C)
        self.cfg_embedder = TimestepEmbedder(C) if config.guidance_embeds else None
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(config.caption_channels, C)
        self.attention_y_norm = RMSNorm(C, eps=1e-5)
        self.gradient_checkpointing = False
        # Dropping caption columns that every row masks out is exact (their softmax weight is
        # exp(−10000) = 0) and saves the K/V projection and attention work; it costs one host sync.
        self.trim_padded_context = True
        self._pos_embed_cache: dict[tuple, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def pos_embed(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """[1, h·w, C] fp32 sincos table for 2K/4K models (cached per size and device)."""
        key = (height, width, str(device))
        if key not in self._pos_embed_cache:
            cfg = self.config
            table = sincos_pos_embed_2d(
                cfg.hidden_size, height, width, cfg.sample_size // cfg.patch_size, cfg.interpolation_scale, device
            )[None]
            if torch.compiler.is_compiling():
                return table  # filling the cache inside a graph would make the next call recompile
            self._pos_embed_cache[key] = table
        return self._pos_embed_cache[key]

    def embed_latents(self, x: torch.Tensor, name: str = "x") -> tuple[torch.Tensor, int, int]:
        """Latents `[B, in_channels, H, W]` -> (tokens `[B, h·w, C]` in the model's dtype, with the
        sincos table added when the model has one; h; w). `name` is the argument named in errors."""
        cfg = self.config
        B, channels, H, W = x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise SanaInputError(f"{name}: latent size {H}×{W} is not divisible by the patch size {p}")
        if channels != cfg.in_channels:
            raise SanaInputError(f"{name} has {channels} channels, the model expects {cfg.in_channels}")
        h, w = H // p, W // p
        tokens = self.x_embedder(x.to(self.dtype))  # [B, N, C]
        if cfg.interpolation_scale is not None:
            tokens = (tokens + self.pos_embed(h, w, tokens.device)).to(self.dtype)
        return tokens, h, w

    def embed_timestep(
        self, timestep: torch.Tensor, batch: int, guidance: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_emb `[B, C]`, the AdaLN input t_mod `[B, 6C]`) for `timestep` (one value or `[B]`),
        with Sprint's embedded `guidance` added to t_emb."""
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(batch)
        t_emb = self.t_embedder(timestep)  # [B, C]
        if self.cfg_embedder is not None:
            if guidance is None:
                raise SanaInputError("this SANA-Sprint model needs `guidance` (the guidance scale, e.g. 4.5)")
            guidance = guidance.reshape(-1).expand(batch) if guidance.numel() == 1 else guidance.reshape(batch)
            t_emb = t_emb + self.cfg_embedder(guidance * self.config.guidance_embeds_scale)
        return t_emb, self.t_block(t_emb)

    def embed_caption(
        self, context: torch.Tensor, context_mask: torch.Tensor | None, trim_context: bool | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(projected caption `[B, L', C]`, additive key-mask bias `[B, 1, 1, L']` or None); L' < L
        when trimming drops the columns every row masks out (see `SanaDiT`'s `trim_context`)."""
        cfg = self.config
        if context.ndim != 3 or context.shape[-1] != cfg.caption_channels:
            raise SanaInputError(
                f"context must be [B, L, {cfg.caption_channels}] (caption_channels), got {list(context.shape)}"
            )
        dtype = self.dtype
        context = context.to(dtype)
        mask_bias = None
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise SanaInputError(f"context_mask {list(context_mask.shape)} does not match context {list(context.shape[:2])}")
            trim = self.trim_padded_context if trim_context is None else trim_context
            if trim and not torch.compiler.is_compiling():  # the trimmed length is data: not in a graph
                context, context_mask = trim_padded_context(context, context_mask)
            mask_bias = ((1 - context_mask.to(dtype)) * CROSS_ATTENTION_MASK_BIAS)[:, None, None, :]  # [B, 1, 1, L]
        return self.attention_y_norm(self.y_embedder.y_proj(context)), mask_bias  # [B, L, C]

    def run_block(
        self,
        block: SanaBlock,
        tokens: torch.Tensor,
        context: torch.Tensor,
        t_mod: torch.Tensor,
        mask_bias: torch.Tensor | None,
        h: int,
        w: int,
    ) -> torch.Tensor:
        """One block, recomputed in the backward pass when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, tokens, context, t_mod, mask_bias, h, w, use_reentrant=False)
        return block(tokens, context, t_mod, mask_bias, h, w)


class SanaDiT(DiTInputs):
    """The SANA Linear DiT.

    `forward(x, timestep, context, context_mask=None, guidance=None, trim_context=None,
    block_residuals=None) -> velocity`:
    - x `[B, in_channels, h, w]` latents (any h, w divisible by the patch size);
    - timestep `[B]`: the values diffusers' `SanaTransformer2DModel` receives (ints ⌊1000σ⌋
      from Flow-DPM-Solver, floats from Flow-Euler, the flow time t ∈ [0, 1] for Sprint);
    - context `[B, L, caption_channels]` text embeddings, any L; context_mask `[B, L]`
      (1 keep, 0 pad) or None;
    - guidance `[B]` the raw guidance scale, Sprint only (multiplied by
      `config.guidance_embeds_scale` inside, as NVlabs' `cfg_embed_scale`);
    - trim_context: drop caption columns every row masks out (`trim_padded_context`, one host
      sync); None follows `self.trim_padded_context`. Never inside `torch.compile`;
    - block_residuals: `block_residuals[i]` `[B, h·w, C]` (or None) is added to the hidden states
      after block i, as a ControlNet's outputs are (`sana.controlnet.SanaControlNet` returns them
      in this form); None, or a shorter list, leaves the other blocks as they are.
    Returns the velocity `[B, out_channels, h, w]` in the model's dtype.
    """

    def __init__(self, config: SanaDiTConfig):
        super().__init__(config)
        C = config.hidden_size
        self.blocks = nn.ModuleList(SanaBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(C, config.patch_size**2 * config.out_channels, eps=1e-6)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        trim_context: bool | None = None,
        block_residuals: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        B = x.shape[0]
        p = self.config.patch_size
        tokens, h, w = self.embed_latents(x)
        if block_residuals is not None:
            check_block_residuals(block_residuals, tokens.shape, len(self.blocks))
        t_emb, t_mod = self.embed_timestep(timestep, B, guidance)
        context, mask_bias = self.embed_caption(context, context_mask, trim_context)

        for i, block in enumerate(self.blocks):
            tokens = self.run_block(block, tokens, context, t_mod, mask_bias, h, w)
            if block_residuals is not None and i < len(block_residuals) and block_residuals[i] is not None:
                residual = block_residuals[i].to(tokens.dtype)
                # Without autograd `tokens` is this forward's own buffer (the blocks update it in place).
                tokens = tokens + residual if torch.is_grad_enabled() else tokens.add_(residual)

        out = self.final_layer(tokens, t_emb)  # [B, N, p·p·c]
        out = out.reshape(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, -1, h * p, w * p)


def check_block_residuals(residuals: Sequence[torch.Tensor | None], shape: torch.Size, depth: int) -> None:
    """Raise `SanaInputError` unless `residuals` holds at most `depth` entries, each None or a
    tensor of the hidden states' `shape` `[B, N, C]`."""
    if isinstance(residuals, torch.Tensor) or not isinstance(residuals, Sequence):
        raise SanaInputError(f"block_residuals must be a list of tensors (or None) per block, got {type(residuals).__name__}")
    if len(residuals) > depth:
        raise SanaInputError(f"block_residuals has {len(residuals)} entries, but the DiT has {depth} blocks")
    for i, residual in enumerate(residuals):
        if residual is not None and tuple(residual.shape) != tuple(shape):
            raise SanaInputError(
                f"block_residuals[{i}] has shape {list(residual.shape)}, the hidden states after block {i} are {list(shape)}"
            )


def kept_context_length(mask: torch.Tensor) -> int:
    """How many leading caption columns of `mask` `[B, L]` (1 keep, 0 pad) some row keeps: the
    columns after them can be dropped exactly. All L when a row keeps nothing (such a row
    attends uniformly to every column). Reads the mask on the host."""
    kept = mask.bool()
    if not bool(kept.any(dim=1).all()):
        return mask.shape[1]
    return int(kept.any(dim=0).nonzero().max()) + 1


def trim_padded_context(context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing caption columns `[B, L, ...]` that every row of `mask` `[B, L]` masks out.

    Exact for the DiT's cross-attention (a masked column's softmax weight is exp(−10000) = 0).
    Reads the mask on the host, so a sampler calls it once before its loop, not per step.
    """
    length = kept_context_length(mask)
    return context[:, :length], mask[:, :length]


@contextmanager
def perturbed_self_attention(dit: SanaDiT, layers: Iterable[int], rows: slice) -> Iterator[SanaDiT]:
    """Within the block, the linear self-attention of blocks `layers` returns proj(V) (identity
    attention) for the batch rows `rows`: the perturbed branch of perturbed-attention guidance.

    Every other row and block is untouched, as in NVlabs' PAG processors and diffusers'
    `PAGCFGSanaLinearAttnProcessor2_0` / `PAGIdentitySanaLinearAttnProcessor2_0` (which put the
    perturbed chunk last, so `rows` is usually `slice(k * B, (k + 1) * B)`). The previous
    setting is restored on exit, also when the block raises. Raises `SanaCheckpointError` for
    a layer index outside the DiT's depth.
    """
    depth = len(dit.blocks)
    layers = sorted({int(i) for i in layers})
    outside = [i for i in layers if not 0 <= i < depth]
    if outside:
        raise SanaInputError(f"PAG layers {outside} do not exist: this DiT has blocks 0..{depth - 1}")
    attentions = [dit.blocks[i].attn for i in layers]
    previous = [attn.identity_rows for attn in attentions]
    for attn in attentions:
        attn.identity_rows = rows
    try:
        yield dit
    finally:
        for attn, rows_before in zip(attentions, previous):
            attn.identity_rows = rows_before
