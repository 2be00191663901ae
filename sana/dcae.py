"""DC-AE, the deep-compression autoencoder of SANA: every released layout in one model class.

Two families of releases share this code (see `DCAE_PRESETS`; the config and the presets live
in `sana/dcae_config.py`, the memory estimate and the tiling in `sana/dcae_tiling.py`):

- SANA f32c32 (1.0 / 1.1): stride-2 conv downsampling, nearest-×2 + conv upsampling,
  RMSNorm2d/SiLU everywhere, multi-scale (5×5) ReLU linear attention in the deep stages;
- in / mix f32c32, f64c128, f128c512: empty first stage (the image goes straight through a
  pixel-unshuffle conv), pixel (un)shuffle resampling, BatchNorm/ReLU ResBlocks in the decoder's
  shallow stages, single-scale attention.

Parameter names follow diffusers' `AutoencoderDC` (`encoder.down_blocks.{i}.{j}...`), except
that the attention keeps its fused 1×1 qkv conv (`attn.to_qkv.weight`, `[3C, C, 1, 1]`, the
original layout's channel order) and its 1×1 output conv stays 4-D. `sana/dcae_io.py` maps
both the original mit-han-lab layout and the diffusers layout onto these names.

Shapes: B batch, C stage width, c latent channels, f spatial compression, N = h·w pixels of a
feature map, d attention head dim, G = heads·(1 + number of multi-scale branches).

Numerics follow diffusers (the project's reference): RMSNorm2d statistics in fp32, the linear
attention entirely in fp32 whatever the model dtype, denominator epsilon 1e-15.

Never float16: the decoder's activations pass fp16's largest value (65504) in its last stages
and decode to NaN, i.e. black images (diffusers' examples move the DC-AE to bf16 for this).
`encode` / `decode` refuse an fp16 model; `default_dcae_dtype` is the dtype to run in instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The config's names are the DC-AE's public names too (`from sana.dcae import DCAEConfig, EVIT_BLOCK`).
from .dcae_config import DCAE_PRESETS, EVIT_BLOCK, RESBLOCK, DCAEConfig
from .dcae_tiling import TileProgress, run_tiled
from .errors import SanaInputError
from .kernels.constants import LINEAR_ATTENTION_EPS  # 1e-15, shared with the Triton kernel
from .ops import fused

# LINEAR_ATTENTION_EPS: diffusers and the original code both use 1e-15; only an all-zero query
# or key column feels it.
NORM_EPS = 1e-5

FP16_OVERFLOW = (
    "the DC-AE overflows in float16 (its decoder's activations pass fp16's maximum 65504) and decodes NaN, "
    "i.e. black images"
)


def default_dcae_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a DC-AE runs in when none is asked for: bf16 on an accelerator that runs it
    natively, fp32 on the CPU (and on CUDA GPUs without bf16). Never fp16 (`FP16_OVERFLOW`)."""
    device = torch.device(device)
    if device.type == "cpu" or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        return torch.float32
    return torch.bfloat16


def check_dcae_dtype(dtype: torch.dtype | None, option: str = "dtype") -> None:
    """Raise `SanaInputError` naming `option` for a float16 DC-AE dtype (see `FP16_OVERFLOW`)."""
    if dtype == torch.float16:
        raise SanaInputError(f"{option} float16: {FP16_OVERFLOW}; use bfloat16 or float32")


# ----------------------------------------------------------------------------- primitives


@fused
def rms_norm_2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMS norm over the channel dim of x `[B, C, H, W]` (statistics in fp32, no mean removal),
    then `· weight + bias` `[C]`, then `residual + ·` when a residual `[B, C, H, W]` is given."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.square().mean(dim=1, keepdim=True) + eps)).to(weight.dtype)
    del x32  # the fp32 copy of a 16-bit map goes before the next full-size allocation
    # One fused op, so that at most two full-size temporaries are alive at once.
    out = torch.addcmul(bias[:, None, None], normed, weight[:, None, None]).to(x.dtype)
    del normed
    if residual is None:
        return out
    # In place into the fresh `out` (addition commutes exactly) when it has the residual's layout,
    # so the result keeps the block input's memory format (channels-last) either way.
    return out.add_(residual) if out.stride() == residual.stride() else residual + out


class RMSNorm2d(nn.Module):
    """RMS norm over the channel dim of a [B, C, H, W] map, with weight and bias (no mean removal)."""

    def __init__(self, channels: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:  # [B, C, H, W] -> same
        return rms_norm_2d(x, self.weight, self.bias, self.eps, residual)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "rms_norm":
        return RMSNorm2d(channels)
    return nn.BatchNorm2d(channels, eps=NORM_EPS, momentum=0.1)


def _residual_norm(norm: nn.Module, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + norm(y); an RMSNorm2d adds the residual in its own pass over memory."""
    return norm(y, residual) if isinstance(norm, RMSNorm2d) else residual + norm(y)


def _act(kind: str) -> nn.Module:
    return {"silu": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6}[kind]()


@fused
def relu_linear_attention_multiscale(qkv: torch.Tensor, head_dim: int, eps: float = LINEAR_ATTENTION_EPS) -> torch.Tensor:
    """ReLU-kernel linear attention over all pixels of a feature map, one group per head and scale.

    qkv: [B, G·3·d, H, W], the concatenation of the plain qkv projection and every multi-scale
    aggregated copy; channels [3d·g, 3d·g + d) are group g's queries, the next d its keys and the
    next d its values. Returns [B, G·d, H, W] in qkv's dtype; the arithmetic is fp32 throughout.

    out_i = Σ_j v_j (k_j·q_i) / (Σ_j k_j·q_i + eps) with q, k passed through ReLU. When the map has
    no more pixels than d, the N×N form is cheaper and is used instead (same function).
    """
    batch, _, height, width = qkv.shape
    pixels = height * width
    grouped = qkv.float().reshape(batch, -1, 3 * head_dim, pixels)  # [B, G, 3d, N]
    q, k, v = grouped.split(head_dim, dim=2)
    q = F.relu(q)
    k = F.relu(k)
    if pixels > head_dim:
        kv = torch.matmul(v, k.transpose(-1, -2))  # [B, G, d, d]
        numerator = torch.matmul(kv, q)  # [B, G, d, N]
        denominator = torch.matmul(k.sum(dim=-1).unsqueeze(-2), q)  # [B, G, 1, N]
        out = numerator / (denominator + eps)
    else:
        scores = torch.matmul(k.transpose(-1, -2), q)  # [B, G, N_key, N_query]
        scores = scores / (scores.sum(dim=2, keepdim=True) + eps)
        out = torch.matmul(v, scores)  # [B, G, d, N]
    return out.reshape(batch, -1, height, width).to(qkv.dtype)


# ----------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """x + norm(conv3×3_nobias(act(conv3×3(x)))), width unchanged."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)  # [C, C, 3, 3]
        self.nonlinearity = _act(act)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)  # [C, C, 3, 3]
        self.norm = _norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual_norm(self.norm, self.conv2(self.nonlinearity(self.conv1(x))), x)


class MultiscaleQKV(nn.Module):
    """One extra attention scale: an s×s depthwise conv, then a 1×1 conv within each d-channel group."""

    def __init__(self, qkv_channels: int, head_dim: int, kernel_size: int):
        super().__init__()
        # [3C, 1, s, s]
        self.proj_in = nn.Conv2d(qkv_channels, qkv_channels, kernel_size, padding=kernel_size // 2, groups=qkv_channels, bias=False)
        # [3C, d, 1, 1]: each group is one head's q, k or v slice
        self.proj_out = nn.Conv2d(qkv_channels, qkv_channels, 1, groups=qkv_channels // head_dim, bias=False)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(qkv))


class MultiscaleLinearAttention(nn.Module):
    """x + norm(proj(attention(qkv(x) ⊕ multi-scale copies))): the LiteMLA branch of a ViT block."""

    def __init__(self, channels: int, head_dim: int, scales: Sequence[int], norm: str):
        super().__init__()
        self.head_dim = head_dim
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)  # [3C, C, 1, 1], per-head q|k|v
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleQKV(3 * channels, head_dim, s) for s in scales)
        self.to_out = nn.Conv2d(channels * (1 + len(scales)), channels, 1, bias=False)  # [C, C(1+S), 1, 1]
        self.norm_out = _norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.to_qkv(x)  # [B, 3C, H, W]
        if len(self.to_qkv_multiscale):
            qkv = torch.cat([qkv, *(branch(qkv) for branch in self.to_qkv_multiscale)], dim=1)  # [B, 3C(1+S), H, W]
        attended = relu_linear_attention_multiscale(qkv, self.head_dim)  # [B, C(1+S), H, W]
        return _residual_norm(self.norm_out, self.to_out(attended), x)


class GLUMBConv(nn.Module):
    """x + norm(conv1×1(a · silu(g))), [a, g] = dwconv3×3(silu(conv1×1(x))) split in halves (4C each)."""

    def __init__(self, channels: int, expand_ratio: int = 4):
        super().__init__()
        hidden = expand_ratio * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)  # [8C, C, 1, 1]
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)  # [8C, 1, 3, 3]
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)  # [C, 4C, 1, 1]
        self.norm = RMSNorm2d(channels)
        self.nonlinearity = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_depth(self.nonlinearity(self.conv_inverted(x)))
        value, gate = h.chunk(2, dim=1)
        return _residual_norm(self.norm, self.conv_point(value * self.nonlinearity(gate)), x)


class EfficientViTBlock(nn.Module):
    """Global context (multi-scale linear attention) then local mixing (GLUMBConv), each residual."""

    def __init__(self, channels: int, head_dim: int, scales: Sequence[int], norm: str):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, scales, norm)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


class DownBlock(nn.Module):
    """Halve the side: stride-2 conv, or conv to C_out/4 then pixel-unshuffle; plus the averaging shortcut.

    The shortcut pixel-unshuffles the input (4·C_in channels) and averages consecutive groups of
    4·C_in/C_out channels, a parameter-free path that carries the input through the compression.
    """

    def __init__(self, in_channels: int, out_channels: int, pixel_unshuffle: bool, shortcut: bool):
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.group_size = 4 * in_channels // out_channels
        if pixel_unshuffle:
            self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, 1, 1)  # [C_out/4, C_in, 3, 3]
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1)  # [C_out, C_in, 3, 3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.pixel_unshuffle:
            out = F.pixel_unshuffle(out, 2)
        if self.shortcut:
            out = out + F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group_size)).mean(dim=2)
        return out


# Nearest ×2 followed by a 3×3 conv, folded. Output row 2i+a (parity a) reads upsampled rows
# 2i+a−1, 2i+a, 2i+a+1, which are low-resolution rows (i−1, i, i) for a = 0 and (i, i, i+1) for
# a = 1: the three kernel rows fold into two. Per output parity pair (a, b) the layer is then a 2×2
# conv on the low-resolution map, so the 4×-larger upsampled input is never built and each output
# pixel costs 4 instead of 9 taps. The zero padding agrees: upsampled row −1 is low-res row −1.
_PARITY_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))  # [parity][2×2 row][3×3 row]


def folded_upsample_kernels(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] → [2, 2, C_out, C_in, 2, 2]: the 2×2 kernel of each output parity (a, b).

    The taps are summed in fp32 and rounded once to the weight's dtype."""
    taps = torch.tensor(_PARITY_TAPS, device=weight.device, dtype=torch.float32)  # [2, 2, 3]
    return torch.einsum("ary,oiyx,bsx->aboirs", taps, weight.float(), taps).to(weight.dtype)


def nearest_upsample_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shortcut_repeats: int = 0
) -> torch.Tensor:
    """`conv3x3(nearest×2(x))`, plus the duplicating shortcut when `shortcut_repeats` > 0.

    x [B, C_in, H, W], weight [C_out, C_in, 3, 3] -> [B, C_out, 2H, 2W], in x's memory format.
    The shortcut is `pixel_shuffle(x.repeat_interleave(shortcut_repeats, 1), 2)`, added per parity
    without building either 4×-sized tensor.
    """
    batch, _, height, width = x.shape
    out_channels = weight.shape[0]
    kernels = folded_upsample_kernels(weight)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty(batch, out_channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    parities = out.unflatten(2, (height, 2)).unflatten(4, (width, 2))  # [B, C_out, H, 2, W, 2] view
    for a in range(2):
        for b in range(2):
            # padding 1 gives (H+1)×(W+1) positions; parity (a, b) is the window starting at (a, b).
            phase = F.conv2d(x, kernels[a, b], bias, padding=1)[:, :, a:a + height, b:b + width]
            if shortcut_repeats:
                # pixel_shuffle puts input channel 4c + k at output channel c, parity k = 2a + b;
                # after repeat_interleave that is channel (4c + k) // repeats of x.
                k, r = 2 * a + b, shortcut_repeats
                if 4 % r == 0:
                    phase = phase + x[:, k // r::4 // r]
                else:
                    phase = phase + x.index_select(1, (torch.arange(out_channels, device=x.device) * 4 + k) // r)
            parities[:, :, :, a, :, b] = phase
    return out


def nearest_upsample_conv_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shortcut_repeats: int = 0
) -> torch.Tensor:
    """`nearest_upsample_conv` as the layer is written (and as diffusers runs it): the upsampled
    input, the 3×3 conv, and the repeated, pixel-shuffled shortcut. For tests and benches."""
    out = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    if shortcut_repeats:
        out = out + F.pixel_shuffle(x.repeat_interleave(shortcut_repeats, dim=1), 2)
    return out


class UpBlock(nn.Module):
    """Double the side: nearest ×2 then conv, or conv to 4·C_out then pixel-shuffle; plus the duplicating shortcut.

    The shortcut repeats every input channel 4·C_out/C_in times and pixel-shuffles the result.
    The nearest ×2 + conv variant (SANA's DC-AE) runs folded (`nearest_upsample_conv`).
    """

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool, shortcut: bool):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = 4 * out_channels // in_channels
        # interpolate: [C_out, C_in, 3, 3]; pixel shuffle: [4·C_out, C_in, 3, 3]
        self.conv = nn.Conv2d(in_channels, out_channels if interpolate else 4 * out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            return nearest_upsample_conv(x, self.conv.weight, self.conv.bias, self.repeats if self.shortcut else 0)
        out = F.pixel_shuffle(self.conv(x), 2)
        if self.shortcut:
            out = out + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)
        return out


def _stage_block(kind: str, channels: int, head_dim: int, scales: Sequence[int], norm: str, act: str) -> nn.Module:
    if kind == RESBLOCK:
        return ResBlock(channels, norm, act)
    return EfficientViTBlock(channels, head_dim, scales, norm)


def _to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    # Channels-last feature maps let the CPU (oneDNN) and cuDNN convolutions skip the reorder
    # copies of their input and output: ~40% less peak memory at full resolution on CPU.
    # Elementwise ops, nearest interpolation and the residual adds keep the layout.
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _run_stage(stage: nn.Sequential, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for block in stage:
        if use_checkpoint:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class DCAEEncoder(nn.Module):
    """[B, 3, H, W] image in [-1, 1] -> [B, c, H/f, W/f] unscaled latent."""

    def __init__(self, config: DCAEConfig):
        super().__init__()
        widths, depths = config.encoder_widths, config.encoder_depths
        pixel_unshuffle = config.downsample_block_type == "pixel_unshuffle"
        if depths[0] > 0:
            self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, 1, 1)  # [C0, 3, 3, 3]
        else:
            # Empty first stage: the input is halved at once, with no shortcut (3 channels do not average).
            self.conv_in = DownBlock(config.in_channels, widths[1], pixel_unshuffle, shortcut=False)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [
                _stage_block(config.encoder_block_types[i], width, config.attention_head_dim,
                             config.encoder_qkv_multiscales[i], "rms_norm", "silu")
                for _ in range(depth)
            ]
            if i < len(widths) - 1 and depth > 0:
                blocks.append(DownBlock(width, widths[i + 1], pixel_unshuffle, shortcut=True))
            stages.append(nn.Sequential(*blocks))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 3, 1, 1)  # [c, C_last, 3, 3]
        self.out_shortcut = config.encoder_out_shortcut
        self.out_group_size = widths[-1] // config.latent_channels
        self.gradient_checkpointing = False
        self.channels_last = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        x = self.conv_in(_to_memory_format(x, self.channels_last))
        for stage in self.down_blocks:
            x = _run_stage(stage, x, use_checkpoint)
        out = self.conv_out(x)
        if self.out_shortcut:
            out = out + x.unflatten(1, (-1, self.out_group_size)).mean(dim=2)
        return out.contiguous()


class DCAEDecoder(nn.Module):
    """[B, c, h, w] unscaled latent -> [B, 3, h·f, w·f] image (unbounded, about [-1, 1])."""

    def __init__(self, config: DCAEConfig):
        super().__init__()
        widths, depths = config.decoder_widths, config.decoder_depths
        interpolate = config.upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, 1, 1)  # [C_last, c, 3, 3]
        self.in_shortcut = config.decoder_in_shortcut
        self.in_repeats = widths[-1] // config.latent_channels
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            if i < len(widths) - 1 and depth > 0:
                blocks.append(UpBlock(widths[i + 1], width, interpolate, shortcut=True))
            blocks += [
                _stage_block(config.decoder_block_types[i], width, config.attention_head_dim,
                             config.decoder_qkv_multiscales[i], config.decoder_norm_types[i], config.decoder_act_fns[i])
                for _ in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
        self.up_blocks = nn.ModuleList(stages)  # index = stage; run deepest first
        head_width = widths[0] if depths[0] > 0 else widths[1]
        self.norm_out = RMSNorm2d(head_width)
        self.conv_act = _act(config.decoder_conv_act_fn)
        if depths[0] > 0:
            self.conv_out = nn.Conv2d(head_width, config.in_channels, 3, 1, 1)  # [3, C0, 3, 3]
        else:
            self.conv_out = UpBlock(head_width, config.in_channels, interpolate, shortcut=False)
        self.gradient_checkpointing = False
        self.channels_last = True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        z = _to_memory_format(z, self.channels_last)
        x = self.conv_in(z)
        if self.in_shortcut:
            x = x + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in reversed(self.up_blocks):
            x = _run_stage(stage, x, use_checkpoint)
        # Rebinding x at each step frees the full-resolution map it held.
        x = self.norm_out(x)
        x = self.conv_act(x)
        return self.conv_out(x).contiguous()


# ----------------------------------------------------------------------------- the model


class DCAE(nn.Module):
    """A DC-AE: `encode` images to unscaled latents, `decode` them back.

    Images are [B, 3, H, W] in [-1, 1]; H and W must be multiples of `spatial_compression`
    (they are never padded: `encode` raises `SanaInputError` otherwise). Latents are
    [B, c, H/f, W/f] and are *not* multiplied by `scaling_factor`; a diffusion model wants
    `encode(x) * scaling_factor` and `decode(z / scaling_factor)`.

    Both directions run under the caller's grad mode (wrap inference in `torch.inference_mode()`).
    Large inputs are processed image by image, then in blended overlapping tiles, whenever the
    estimated activation memory exceeds the budget in bytes (`memory_budget` argument, else the
    `memory_budget` attribute, else what the device has free; weights and the output tensor are
    not counted); see `sana/dcae_tiling.py`. `channels_last` feature maps are used inside.
    Tiled output differs slightly from untiled output because the attention is global.
    """

    def __init__(self, config: DCAEConfig | None = None):
        super().__init__()
        self.config = config or DCAEConfig()
        self.encoder = DCAEEncoder(self.config)
        self.decoder = DCAEDecoder(self.config)
        self.memory_budget: int | None = None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def _check_input(self, x: torch.Tensor, channels: int, what: str, multiple: int) -> torch.Tensor:
        if self.dtype == torch.float16:
            raise SanaInputError(
                f"DC-AE {what} in float16: {FP16_OVERFLOW}; cast the model to bfloat16 or float32 first "
                "(e.g. dcae.to(torch.bfloat16))"
            )
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SanaInputError(f"DC-AE {what}: expected a [B, {channels}, H, W] tensor, found {shape}")
        if x.shape[1] != channels:
            raise SanaInputError(f"DC-AE {what}: expected {channels} channels, found shape {list(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise SanaInputError(
                f"DC-AE {what}: height and width must be multiples of the compression {multiple}, "
                f"found {x.shape[2]}×{x.shape[3]} (crop or pad the image first)"
            )
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise SanaInputError(f"DC-AE {what}: empty input of shape {list(x.shape)}")
        return x.to(device=self.device, dtype=self.dtype)

    def encode(
        self,
        images: torch.Tensor,
        *,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        memory_budget: int | None = None,
        progress: TileProgress | None = None,
    ) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> unscaled latents [B, c, H/f, W/f] (model dtype and device).

        `tile_size` / `tile_overlap` are in image pixels (multiples of f); giving `tile_size`
        forces tiling when the image is larger, otherwise tiling is chosen from `memory_budget`
        (bytes). `progress(done, total)` is called before the first network call (chunk or
        tile) and after each one, for a progress bar. Raises `SanaInputError` when H or W is
        not a multiple of f.
        """
        images = self._check_input(images, self.config.in_channels, "encode", self.spatial_compression)
        return run_tiled(self, "encode", images, tile_size, tile_overlap, memory_budget, progress)

    def decode(
        self,
        latents: torch.Tensor,
        *,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        memory_budget: int | None = None,
        progress: TileProgress | None = None,
    ) -> torch.Tensor:
        """Unscaled latents [B, c, h, w] -> images [B, 3, h·f, w·f] (model dtype and device).

        Tiling and `progress` as in `encode`; any latent size works, including sizes that are
        not a multiple of the tile.
        """
        latents = self._check_input(latents, self.config.latent_channels, "decode", 1)
        return run_tiled(self, "decode", latents, tile_size, tile_overlap, memory_budget, progress)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct images (encoder then decoder, untiled): the training path."""
        return self.decoder(self.encoder(images))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_dcae(config: DCAEConfig | str, *, device: torch.device | str | None = None) -> DCAE:
    """A DC-AE with PyTorch's default initialisation (or on the meta device), from a config or preset name."""
    if isinstance(config, str):
        if config not in DCAE_PRESETS:
            raise SanaInputError(f"unknown DC-AE preset {config!r} (known: {sorted(DCAE_PRESETS)})")
        config = DCAE_PRESETS[config]
    if device is None:
        return DCAE(config)
    with torch.device(device):
        return DCAE(config)


def latent_rms_scaling_factor(latents: torch.Tensor) -> float:
    """The scaling factor a trained DC-AE should carry: 1 / RMS of its latents over a dataset."""
    return float(1.0 / math.sqrt(latents.float().square().mean().item()))
