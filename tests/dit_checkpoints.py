"""Build tiny random SANA DiTs with diffusers and write them in each official layout.

The official layout is written here from the spec's key table (sana_spec.md §3.2), not through
`sana.save_dit`, so the loader is checked against an independent statement of the format.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SanaTransformer2DModel
from node_fixtures import randomize_at_trained_scale
from safetensors.torch import save_file

TINY = dict(
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=4,
    num_attention_heads=3,
    num_cross_attention_heads=2,
    cross_attention_head_dim=6,
    cross_attention_dim=12,
    caption_channels=10,
    sample_size=8,
)

# The released families at tiny width: what each one switches on.
VARIANTS = {
    "sana": {},
    "sana-2k-pe": {"interpolation_scale": 1.0},
    "sana-4k-pe": {"interpolation_scale": 2.0},
    "sana-1.5": {"qk_norm": "rms_norm_across_heads"},
    "sana-sprint": {"qk_norm": "rms_norm_across_heads", "guidance_embeds": True},
}


def random_reference(variant: str, seed: int = 0, **overrides) -> SanaTransformer2DModel:
    """A diffusers model with every parameter random (not diffusers' zero or one init)."""
    torch.manual_seed(seed)
    return randomize_at_trained_scale(SanaTransformer2DModel(**{**TINY, **VARIANTS[variant], **overrides}).eval())


def official_state_dict(ref: SanaTransformer2DModel) -> dict[str, torch.Tensor]:
    """The NVlabs key layout of `ref`'s weights, as the spec's table defines it."""
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    cfg = ref.config
    C = cfg.num_attention_heads * cfg.attention_head_dim
    side = cfg.sample_size // cfg.patch_size
    out: dict[str, torch.Tensor] = {}
    if cfg.interpolation_scale is None:
        out["pos_embed"] = torch.zeros(1, side * side, C)
    else:
        out["pos_embed"] = ref.patch_embed.pos_embed.detach().clone()  # [1, side², C]
    out["x_embedder.proj.weight"] = sd.pop("patch_embed.proj.weight")
    out["x_embedder.proj.bias"] = sd.pop("patch_embed.proj.bias")
    t = "time_embed.timestep_embedder" if cfg.guidance_embeds else "time_embed.emb.timestep_embedder"
    for i, j in (("0", "1"), ("2", "2")):
        for kind in ("weight", "bias"):
            out[f"t_embedder.mlp.{i}.{kind}"] = sd.pop(f"{t}.linear_{j}.{kind}")
            if cfg.guidance_embeds:
                out[f"cfg_embedder.mlp.{i}.{kind}"] = sd.pop(f"time_embed.guidance_embedder.linear_{j}.{kind}")
    for kind in ("weight", "bias"):
        out[f"t_block.1.{kind}"] = sd.pop(f"time_embed.linear.{kind}")
        out[f"y_embedder.y_proj.fc1.{kind}"] = sd.pop(f"caption_projection.linear_1.{kind}")
        out[f"y_embedder.y_proj.fc2.{kind}"] = sd.pop(f"caption_projection.linear_2.{kind}")
        out[f"final_layer.linear.{kind}"] = sd.pop(f"proj_out.{kind}")
    out["y_embedder.y_embedding"] = torch.randn(300, cfg.caption_channels)
    out["attention_y_norm.weight"] = sd.pop("caption_norm.weight")
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    for i in range(cfg.num_layers):
        d, o = f"transformer_blocks.{i}", f"blocks.{i}"
        out[f"{o}.scale_shift_table"] = sd.pop(f"{d}.scale_shift_table")
        out[f"{o}.attn.qkv.weight"] = torch.cat([sd.pop(f"{d}.attn1.to_{x}.weight") for x in "qkv"])
        out[f"{o}.attn.proj.weight"] = sd.pop(f"{d}.attn1.to_out.0.weight")
        out[f"{o}.attn.proj.bias"] = sd.pop(f"{d}.attn1.to_out.0.bias")
        out[f"{o}.cross_attn.q_linear.weight"] = sd.pop(f"{d}.attn2.to_q.weight")
        out[f"{o}.cross_attn.q_linear.bias"] = sd.pop(f"{d}.attn2.to_q.bias")
        out[f"{o}.cross_attn.kv_linear.weight"] = torch.cat([sd.pop(f"{d}.attn2.to_{x}.weight") for x in "kv"])
        out[f"{o}.cross_attn.kv_linear.bias"] = torch.cat([sd.pop(f"{d}.attn2.to_{x}.bias") for x in "kv"])
        out[f"{o}.cross_attn.proj.weight"] = sd.pop(f"{d}.attn2.to_out.0.weight")
        out[f"{o}.cross_attn.proj.bias"] = sd.pop(f"{d}.attn2.to_out.0.bias")
        if cfg.qk_norm:
            for a, b in (("attn", "attn1"), ("cross_attn", "attn2")):
                out[f"{o}.{a}.q_norm.weight"] = sd.pop(f"{d}.{b}.norm_q.weight")
                out[f"{o}.{a}.k_norm.weight"] = sd.pop(f"{d}.{b}.norm_k.weight")
        for ours, theirs in (("inverted_conv", "conv_inverted"), ("depth_conv", "conv_depth")):
            out[f"{o}.mlp.{ours}.conv.weight"] = sd.pop(f"{d}.ff.{theirs}.weight")
            out[f"{o}.mlp.{ours}.conv.bias"] = sd.pop(f"{d}.ff.{theirs}.bias")
        out[f"{o}.mlp.point_conv.conv.weight"] = sd.pop(f"{d}.ff.conv_point.weight")
    if cfg.guidance_embeds:  # Sprint's training-only log-variance head
        out["logvar_linear.weight"] = torch.randn(1, C)
        out["logvar_linear.bias"] = torch.randn(1)
    assert not sd, f"unmapped diffusers keys: {sorted(sd)}"
    return out


def write_official_pth(ref: SanaTransformer2DModel, path: Path, *, wrapped: bool = True) -> Path:
    sd = official_state_dict(ref)
    torch.save({"state_dict": sd, "step": 1000} if wrapped else sd, path)
    return path


def write_diffusers_single_file(ref: SanaTransformer2DModel, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return path


def write_official_safetensors(ref: SanaTransformer2DModel, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in official_state_dict(ref).items()}, str(path))
    return path


def inputs(ref: SanaTransformer2DModel, batch: int = 2, height: int = 6, width: int = 10, length: int = 7, seed: int = 1):
    """Non-square latents, a caption batch with different padding per row."""
    g = torch.Generator().manual_seed(seed)
    cfg = ref.config
    x = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    context = torch.randn(batch, length, cfg.caption_channels, generator=g)
    mask = torch.ones(batch, length)
    for row in range(batch):
        mask[row, max(1, length - 3 - 2 * row):] = 0
    timestep = torch.tensor([999, 312, 47, 500][:batch])
    return x, timestep, context, mask
