"""Tiny random SANA ControlNets built with diffusers, and the files they are released in.

The official layout is written here from the key table of diffusers' conversion script
(`scripts/convert_sana_controlnet_to_diffusers.py`, read in reverse), not through
`sana.save_controlnet`, so the loader is checked against an independent statement of the format.
A released NVlabs file is a whole `SanaMSControlNet`: the base DiT's keys and the ControlNet's,
which shares the base's input side; `write_official_release` writes exactly that.

The two head layouts of the releases, scaled down: Sana 600M (36 heads of 32, cross-attention 16
heads of 72) as 9 heads of 4 and 4 of 9; Sana 1600M (70 of 32, cross 20 of 112) as 35 of 4 and
10 of 14.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SanaControlNetModel, SanaTransformer2DModel

from dit_checkpoints import official_state_dict
from node_fixtures import randomize_at_trained_scale

WIDTHS = {
    "600m": dict(num_attention_heads=9, attention_head_dim=4, num_cross_attention_heads=4, cross_attention_head_dim=9,
                 cross_attention_dim=36),
    "1600m": dict(num_attention_heads=35, attention_head_dim=4, num_cross_attention_heads=10, cross_attention_head_dim=14,
                  cross_attention_dim=140),
}
TINY = dict(in_channels=4, out_channels=4, caption_channels=10, sample_size=8)
CONTROL_LAYERS, BASE_LAYERS = 2, 3

# diffusers name -> NVlabs name of the input side both models share.
SHARED = {
    "patch_embed.proj": "x_embedder.proj",
    "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_embed.linear": "t_block.1",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
}


def random_controlnet(width: str, seed: int = 0, **overrides) -> SanaControlNetModel:
    """A diffusers ControlNet with every parameter random, the zero projections included."""
    torch.manual_seed(seed)
    config = {**TINY, **WIDTHS[width], "num_layers": CONTROL_LAYERS, **overrides}
    return randomize_at_trained_scale(SanaControlNetModel(**config).eval())


def random_base(controlnet: SanaControlNetModel, seed: int = 1, **overrides) -> SanaTransformer2DModel:
    """A random diffusers DiT of the ControlNet's shape, sharing its input side as a release does."""
    torch.manual_seed(seed)
    cfg = controlnet.config
    shape = {k: cfg[k] for k in ("in_channels", "out_channels", "caption_channels", "sample_size", "num_attention_heads",
                                 "attention_head_dim", "num_cross_attention_heads", "cross_attention_head_dim",
                                 "cross_attention_dim", "interpolation_scale")}
    base = randomize_at_trained_scale(SanaTransformer2DModel(**{**shape, "num_layers": BASE_LAYERS, **overrides}).eval())
    shared = {k: v for k, v in controlnet.state_dict().items() if k.rsplit(".", 1)[0] in SHARED or k == "caption_norm.weight"}
    base.load_state_dict(shared, strict=False)
    return base


def official_controlnet_state_dict(controlnet: SanaControlNetModel) -> dict[str, torch.Tensor]:
    """NVlabs' keys for the ControlNet's part of a release (and the shared input side)."""
    sd = {k: v.detach().clone() for k, v in controlnet.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for theirs, ours in SHARED.items():
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = sd.pop(f"{theirs}.{kind}")
    out["attention_y_norm.weight"] = sd.pop("caption_norm.weight")
    for kind in ("weight", "bias"):
        out[f"controlnet.0.before_proj.{kind}"] = sd.pop(f"input_block.{kind}")
    for k in range(controlnet.config.num_layers):
        d, o = f"transformer_blocks.{k}", f"controlnet.{k}.copied_block"
        out[f"{o}.scale_shift_table"] = sd.pop(f"{d}.scale_shift_table")
        out[f"{o}.attn.qkv.weight"] = torch.cat([sd.pop(f"{d}.attn1.to_{x}.weight") for x in "qkv"])
        for kind in ("weight", "bias"):
            out[f"{o}.attn.proj.{kind}"] = sd.pop(f"{d}.attn1.to_out.0.{kind}")
            out[f"{o}.cross_attn.q_linear.{kind}"] = sd.pop(f"{d}.attn2.to_q.{kind}")
            out[f"{o}.cross_attn.kv_linear.{kind}"] = torch.cat([sd.pop(f"{d}.attn2.to_{x}.{kind}") for x in "kv"])
            out[f"{o}.cross_attn.proj.{kind}"] = sd.pop(f"{d}.attn2.to_out.0.{kind}")
            out[f"{o}.mlp.inverted_conv.conv.{kind}"] = sd.pop(f"{d}.ff.conv_inverted.{kind}")
            out[f"{o}.mlp.depth_conv.conv.{kind}"] = sd.pop(f"{d}.ff.conv_depth.{kind}")
            out[f"controlnet.{k}.after_proj.{kind}"] = sd.pop(f"controlnet_blocks.{k}.{kind}")
        out[f"{o}.mlp.point_conv.conv.weight"] = sd.pop(f"{d}.ff.conv_point.weight")
    assert not sd, f"unmapped diffusers keys: {sorted(sd)}"
    return out


def official_release_state_dict(controlnet: SanaControlNetModel, base: SanaTransformer2DModel) -> dict[str, torch.Tensor]:
    """The whole `SanaMSControlNet` state dict NVlabs releases: the base DiT's keys (pos_embed, the
    learned null caption, every block, the final layer) and the ControlNet's."""
    release = official_state_dict(base)
    control = official_controlnet_state_dict(controlnet)
    for key in set(release) & set(control):  # the shared input side: one tensor in a release
        assert torch.equal(release[key], control[key]), f"{key}: the base and the ControlNet must share it"
    return {**release, **control}


def write_official_release(controlnet: SanaControlNetModel, base: SanaTransformer2DModel, path: Path,
                           *, dtype: torch.dtype | None = None) -> Path:
    """`path` as NVlabs releases it: `{"state_dict": ...}` of the whole model (in `dtype` if given)."""
    state = official_release_state_dict(controlnet, base)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    torch.save({"state_dict": state}, path)
    return path


def inputs(controlnet: SanaControlNetModel, batch: int = 2, height: int = 6, width: int = 10, length: int = 7, seed: int = 1):
    """Non-square latents and control latents, a caption batch with different padding per row."""
    g = torch.Generator().manual_seed(seed)
    cfg = controlnet.config
    x = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    control = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    context = torch.randn(batch, length, cfg.caption_channels, generator=g)
    mask = torch.ones(batch, length)
    for row in range(batch):
        mask[row, max(1, length - 3 - 2 * row):] = 0
    timestep = torch.tensor([999, 312, 47, 500][:batch])
    return x, timestep, context, control, mask
