"""Reading and writing SANA DiT checkpoints in every official layout.

Layouts:
- **official** (NVlabs): `.pth` with weights under `state_dict` (or bare), keys such as
  `blocks.{i}.attn.qkv.weight`; also the same keys in a `.safetensors` file, and either of
  them behind ComfyUI's `model.diffusion_model.` prefix.
- **diffusers**: a `SanaTransformer2DModel` folder (`config.json` + safetensors, sharded with
  an index too, or a pipeline root with a `transformer/` sub-folder), or a single safetensors
  file with diffusers keys.

Also NVlabs' training checkpoints (`epoch_*_step_*.pth`, `latest.pth`: `state_dict`,
`state_dict_ema`, optimizer, scheduler and RNG state; `ema=True` takes the EMA weights) and
sharded official safetensors given as their `*.safetensors.index.json`.

`key_specs` ties each of our parameters to one or more keys of a layout, as a
`sana.checkpoint.KeySpec` (Q|K|V and K|V are split along dim 0 in diffusers; 1×1 conv weights
are 4-D in both layouts and 2-D in ours); detection and shape inference look names up there.
The diffusers `config.json` translation (`diffusers_config`, `config_from_diffusers`) lives here.
Loading validates every key and shape before any tensor data is read, then streams tensors
into a model built on the meta device, so peak memory is one copy of the weights.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import (
    CONFIG_METADATA_KEY,
    EMA_WEIGHTS_ENTRY,
    CheckpointReader,
    KeySpec,
    assign_state,
    check_config_values,
    check_finite_weights,
    check_keys,
    dominant_float_dtype,
    layout_shapes,
    layout_state,
    open_checkpoint,
    preview,
    read_json_file,
    read_spec,
    stored_config,
    strip_prefix,
    warn_on_config_conflict,
    write_layout,
)
from .dit import DIT_PRESETS, SanaDiT, SanaDiTConfig, default_flow_shift, sincos_pos_embed_2d, variant_name
from .errors import SanaCheckpointError, SanaInputError
from .quant.checkpoint import W8A8_METADATA_KEY, load_w8a8_dit, save_w8a8
from .quant.model import is_w8a8

Layout = Literal["official", "diffusers"]

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.")
# Official keys that inference never uses: the stored PE table (recomputed per size), the
# learned null caption (training-time caption dropout) and Sprint's training-only logvar head.
OFFICIAL_EXTRA_KEYS = ("pos_embed", "y_embedder.y_embedding", "logvar_linear.weight", "logvar_linear.bias")
DEFAULT_MAX_SHARD_BYTES = 10 * 1024**3  # diffusers' default shard size

# Cross-attention heads of the released widths; the weights cannot tell heads apart.
KNOWN_CROSS_HEADS = {1152: (16, 72), 2240: (20, 112)}

# The key only a ControlNet checkpoint holds, per layout (NVlabs' `controlnet.0.before_proj`, the
# diffusers `SanaControlNetModel`'s `input_block`): `load_dit` refuses such a file by naming it,
# and `sana.controlnet_io` tells the layout of a ControlNet file by it.
CONTROLNET_MARKERS: dict[Layout, str] = {"official": "controlnet.0.before_proj.weight", "diffusers": "input_block.weight"}


def holds_controlnet(reader: CheckpointReader) -> bool:
    """Whether the checkpoint is a SANA ControlNet (NVlabs' release or a diffusers `SanaControlNetModel`)."""
    return any(key in reader for key in CONTROLNET_MARKERS.values())


def key_specs(config: SanaDiTConfig, layout: Layout) -> list[KeySpec]:
    """Every parameter of `SanaDiT(config)` and where it lives in `layout`."""
    C, H, p = config.hidden_size, config.mlp_hidden, config.patch_size
    official = layout == "official"
    specs: list[KeySpec] = []

    def add(name: str, shape: tuple[int, ...], *parts: tuple[str, tuple[int, ...]]) -> None:
        specs.append(KeySpec(name, shape, parts or ((name, shape),)))

    def same(name: str, diffusers_name: str, shape: tuple[int, ...]) -> None:
        add(name, shape, (name if official else diffusers_name, shape))

    def linear(ours: str, diffusers_name: str, out_f: int, in_f: int, bias: bool = True) -> None:
        same(f"{ours}.weight", f"{diffusers_name}.weight", (out_f, in_f))
        if bias:
            same(f"{ours}.bias", f"{diffusers_name}.bias", (out_f,))

    same("x_embedder.proj.weight", "patch_embed.proj.weight", (C, config.in_channels, p, p))
    same("x_embedder.proj.bias", "patch_embed.proj.bias", (C,))
    # Sprint's diffusers model drops the `.emb` level of the timestep embedder.
    t_prefix = "time_embed.timestep_embedder" if config.guidance_embeds else "time_embed.emb.timestep_embedder"
    linear("t_embedder.mlp.0", f"{t_prefix}.linear_1", C, 256)
    linear("t_embedder.mlp.2", f"{t_prefix}.linear_2", C, C)
    if config.guidance_embeds:
        linear("cfg_embedder.mlp.0", "time_embed.guidance_embedder.linear_1", C, 256)
        linear("cfg_embedder.mlp.2", "time_embed.guidance_embedder.linear_2", C, C)
    linear("t_block.1", "time_embed.linear", 6 * C, C)
    linear("y_embedder.y_proj.fc1", "caption_projection.linear_1", C, config.caption_channels)
    linear("y_embedder.y_proj.fc2", "caption_projection.linear_2", C, C)
    same("attention_y_norm.weight", "caption_norm.weight", (C,))

    for i in range(config.depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        same(f"{o}.scale_shift_table", f"{d}.scale_shift_table", (6, C))
        if official:
            add(f"{o}.attn.qkv.weight", (3 * C, C))
        else:
            add(f"{o}.attn.qkv.weight", (3 * C, C), *((f"{d}.attn1.to_{x}.weight", (C, C)) for x in "qkv"))
        if config.qk_norm:
            same(f"{o}.attn.q_norm.weight", f"{d}.attn1.norm_q.weight", (C,))
            same(f"{o}.attn.k_norm.weight", f"{d}.attn1.norm_k.weight", (C,))
        linear(f"{o}.attn.proj", f"{d}.attn1.to_out.0", C, C)
        linear(f"{o}.cross_attn.q_linear", f"{d}.attn2.to_q", C, C)
        if official:
            linear(f"{o}.cross_attn.kv_linear", "", 2 * C, C)
        else:
            add(f"{o}.cross_attn.kv_linear.weight", (2 * C, C), *((f"{d}.attn2.to_{x}.weight", (C, C)) for x in "kv"))
            add(f"{o}.cross_attn.kv_linear.bias", (2 * C,), *((f"{d}.attn2.to_{x}.bias", (C,)) for x in "kv"))
        if config.qk_norm:
            same(f"{o}.cross_attn.q_norm.weight", f"{d}.attn2.norm_q.weight", (C,))
            same(f"{o}.cross_attn.k_norm.weight", f"{d}.attn2.norm_k.weight", (C,))
        linear(f"{o}.cross_attn.proj", f"{d}.attn2.to_out.0", C, C)
        conv = (lambda k: f"{o}.mlp.{k}.conv") if official else (lambda k: f"{d}.ff.conv_{k.split('_')[0]}")
        add(f"{o}.mlp.inverted_conv.weight", (2 * H, C), (f"{conv('inverted_conv')}.weight", (2 * H, C, 1, 1)))
        add(f"{o}.mlp.inverted_conv.bias", (2 * H,), (f"{conv('inverted_conv')}.bias", (2 * H,)))
        add(f"{o}.mlp.depth_conv.weight", (2 * H, 1, 3, 3), (f"{conv('depth_conv')}.weight", (2 * H, 1, 3, 3)))
        add(f"{o}.mlp.depth_conv.bias", (2 * H,), (f"{conv('depth_conv')}.bias", (2 * H,)))
        add(f"{o}.mlp.point_conv.weight", (C, H), (f"{conv('point_conv')}.weight", (C, H, 1, 1)))

    linear("final_layer.linear", "proj_out", p * p * config.out_channels, C)
    same("final_layer.scale_shift_table", "scale_shift_table", (2, C))
    return specs


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _layout_names(layout: Layout) -> dict[str, str]:
    """Our parameter name -> its (first) key in `layout`, for one block of a model with every
    optional part; what detection and shape inference look up, told by the one key table."""
    probe = SanaDiTConfig(depth=1, qk_norm=True, guidance_embeds=True)
    return {spec.name: spec.parts[0][0] for spec in key_specs(probe, layout)}


def detect_layout(reader: CheckpointReader) -> Layout:
    for layout in ("official", "diffusers"):
        names = _layout_names(layout)
        if names["x_embedder.proj.weight"] in reader or names["blocks.0.attn.qkv.weight"] in reader:
            return layout
    sample = sorted(reader.keys())[:8]
    raise SanaCheckpointError(
        f"{reader.path}: unknown format: neither official SANA keys (x_embedder.*, blocks.N.*) nor diffusers "
        f"keys (patch_embed.*, transformer_blocks.N.*); first keys: {sample}"
    )


def _require(reader: CheckpointReader, key: str) -> tuple[int, ...]:
    if key not in reader:
        raise SanaCheckpointError(f"{reader.path}: missing key {key!r}, needed to detect the model variant")
    return reader.shape(key)


def official_pe(reader: CheckpointReader, hidden: int) -> tuple[int | None, float | None]:
    """Sample size and PE interpolation scale from the stored `pos_embed` ([1, side², C])."""
    if "pos_embed" not in reader:
        return None, None
    shape = reader.shape("pos_embed")
    side = math.isqrt(shape[-2]) if len(shape) == 3 else 0
    if len(shape) != 3 or side * side != shape[-2] or shape[-1] != hidden:
        raise SanaCheckpointError(f"{reader.path}: key 'pos_embed' has shape {list(shape)}, expected [1, side², {hidden}]")
    table = reader.read("pos_embed").float()[0]
    if not table.abs().max() > 0:
        return side, None  # stored zeros: a NoPE model
    for scale in (1.0, 2.0, 0.5, 4.0, 3.0, 1.5):
        candidate = sincos_pos_embed_2d(hidden, side, side, side, scale)
        if torch.allclose(table, candidate, atol=2e-2):  # tolerant of a bf16-stored table
            return side, scale
    raise SanaCheckpointError(
        f"{reader.path}: key 'pos_embed' holds a table that matches no sincos interpolation scale; pass config="
    )


def infer_config(reader: CheckpointReader, layout: Layout) -> tuple[SanaDiTConfig, list[str]]:
    """A config from tensor shapes and keys, plus notes on what the weights could not tell."""
    notes: list[str] = []
    names = _layout_names(layout)

    def shape(ours: str) -> tuple[int, ...]:
        return _require(reader, names[ours])

    patch = shape("x_embedder.proj.weight")
    blocks = names["blocks.0.scale_shift_table"].removesuffix("0.scale_shift_table")
    depth = len({k[len(blocks):].split(".")[0] for k in reader.keys() if k.startswith(blocks)})
    caption = shape("y_embedder.y_proj.fc1.weight")[1]
    final = shape("final_layer.linear.weight")[0]
    mlp2 = shape("blocks.0.mlp.inverted_conv.weight")[0]
    qk_norm = names["blocks.0.attn.q_norm.weight"] in reader
    guidance = names["cfg_embedder.mlp.0.weight"] in reader
    hidden, in_channels, p = patch[0], patch[1], patch[2]
    if hidden not in KNOWN_CROSS_HEADS:
        raise SanaCheckpointError(
            f"{reader.path}: hidden size {hidden} is not a released SANA width (1152, 2240) and the file carries "
            "no config; the attention head counts cannot be read from weights: pass config="
        )
    cross_heads, cross_dim = KNOWN_CROSS_HEADS[hidden]
    fields: dict[str, Any] = dict(
        hidden_size=hidden,
        depth=depth,
        cross_attention_heads=cross_heads,
        cross_attention_head_dim=cross_dim,
        caption_channels=caption,
        in_channels=in_channels,
        out_channels=final // (p * p),
        patch_size=p,
        mlp_ratio=(mlp2 // 2) / hidden,
        qk_norm=qk_norm,
        guidance_embeds=guidance,
    )
    if layout == "official":
        side, scale = official_pe(reader, hidden)
        fields["sample_size"] = side or 32
        fields["interpolation_scale"] = scale
    elif hidden == 2240 and depth == 20 and not qk_norm and not guidance:
        # Sana-1600M exists at 512/1K (no PE) and 2K/4K (PE): a bare diffusers file cannot tell.
        notes.append(
            "a bare diffusers file cannot tell Sana-1600M 1K (no positional embedding) from 2K/4K; assuming 1K. "
            "Pass config='sana-1600m-2k' or config='sana-1600m-4k' for those"
        )
    config = SanaDiTConfig(**fields)
    config = config.replace(flow_shift=default_flow_shift(config.sample_size))
    return config.replace(variant=variant_name(config)), notes


# Far above every release (the largest, SANA-1.5 4.8B, is 2240 wide and 60 deep), yet small
# enough that a config file cannot make a loader spend minutes or build a huge message.
_BOUNDS: dict[str, tuple[float, float]] = {
    "hidden_size": (1, 65536),
    "depth": (1, 1024),
    "attention_head_dim": (1, 4096),
    "cross_attention_heads": (1, 1024),
    "cross_attention_head_dim": (1, 4096),
    "caption_channels": (1, 65536),
    "in_channels": (1, 4096),
    "out_channels": (1, 4096),
    "patch_size": (1, 64),
    "mlp_ratio": (0.01, 64.0),
    "sample_size": (1, 16384),
    "interpolation_scale": (0.001, 1000.0),
    "guidance_embeds_scale": (-1e6, 1e6),
    "timestep_scale": (-1e6, 1e6),
    "norm_eps": (0.0, 1.0),
    "flow_shift": (0.0, 1e4),
}
# The same bounds under diffusers' config.json names.
_DIFFUSERS_BOUNDS: dict[str, tuple[float, float]] = {
    **{k: _BOUNDS[k] for k in ("attention_head_dim", "caption_channels", "in_channels", "out_channels", "patch_size",
                               "mlp_ratio", "sample_size", "interpolation_scale", "guidance_embeds_scale",
                               "timestep_scale", "norm_eps")},
    "num_layers": _BOUNDS["depth"],
    "num_attention_heads": (1, 1024),
    "num_cross_attention_heads": _BOUNDS["cross_attention_heads"],
    "cross_attention_head_dim": _BOUNDS["cross_attention_head_dim"],
    "cross_attention_dim": _BOUNDS["hidden_size"],
}
_OPTIONAL = ("interpolation_scale", "out_channels")


def diffusers_config(config: SanaDiTConfig) -> dict[str, Any]:
    """The `config.json` diffusers' `SanaTransformer2DModel` reads for `config`."""
    return {
        "_class_name": "SanaTransformer2DModel",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_attention_heads": config.num_attention_heads,
        "attention_head_dim": config.attention_head_dim,
        "num_layers": config.depth,
        "num_cross_attention_heads": config.cross_attention_heads,
        "cross_attention_head_dim": config.cross_attention_head_dim,
        "cross_attention_dim": config.hidden_size,
        "caption_channels": config.caption_channels,
        "mlp_ratio": config.mlp_ratio,
        "dropout": 0.0,
        "attention_bias": False,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "norm_elementwise_affine": False,
        "norm_eps": config.norm_eps,
        "interpolation_scale": config.interpolation_scale,
        "guidance_embeds": config.guidance_embeds,
        "guidance_embeds_scale": config.guidance_embeds_scale,
        "qk_norm": "rms_norm_across_heads" if config.qk_norm else None,
        "timestep_scale": config.timestep_scale,
    }


def config_from_diffusers(data: Mapping, source: str = "config.json") -> SanaDiTConfig:
    """Our config from a diffusers `SanaTransformer2DModel` config.json (missing fields take
    diffusers' defaults), its values checked against sane bounds before anything is built from it."""
    if not isinstance(data, Mapping):
        raise SanaCheckpointError(f"{source}: not a SANA DiT config (a JSON {type(data).__name__}, not an object)")
    check_config_values(source, data, _DIFFUSERS_BOUNDS, optional=_OPTIONAL)
    try:
        config = _translate_diffusers(data)
    except (TypeError, ValueError) as e:  # SanaInputError is a ValueError
        raise SanaCheckpointError(f"{source}: not a valid SANA DiT config: {e}") from e
    check_config_values(source, config.to_dict(), _BOUNDS, optional=_OPTIONAL)  # derived sizes (hidden = heads × dim)
    return config


def _translate_diffusers(d: Mapping) -> SanaDiTConfig:
    heads, head_dim = d.get("num_attention_heads", 70), d.get("attention_head_dim", 32)
    hidden = heads * head_dim
    cross_dim = d.get("cross_attention_dim", hidden)
    if cross_dim != hidden:
        raise SanaInputError(f"cross_attention_dim {cross_dim} differs from the hidden size {hidden}: not a SANA DiT")
    qk_norm = d.get("qk_norm")
    if qk_norm not in (None, "rms_norm_across_heads"):
        raise SanaInputError(f"unsupported qk_norm {qk_norm!r} (SANA uses 'rms_norm_across_heads')")
    sample_size = d.get("sample_size", 32)
    interpolation_scale = d.get("interpolation_scale")
    config = SanaDiTConfig(
        hidden_size=hidden,
        depth=d.get("num_layers", 20),
        attention_head_dim=head_dim,
        cross_attention_heads=d.get("num_cross_attention_heads", 20),
        cross_attention_head_dim=d.get("cross_attention_head_dim", 112),
        caption_channels=d.get("caption_channels", 2304),
        in_channels=d.get("in_channels", 32),
        out_channels=d.get("out_channels") or d.get("in_channels", 32),
        patch_size=d.get("patch_size", 1),
        mlp_ratio=d.get("mlp_ratio", 2.5),
        sample_size=sample_size,
        interpolation_scale=None if interpolation_scale is None else float(interpolation_scale),
        qk_norm=qk_norm is not None,
        guidance_embeds=bool(d.get("guidance_embeds", False)),
        guidance_embeds_scale=d.get("guidance_embeds_scale", 0.1),
        timestep_scale=d.get("timestep_scale", 1.0),
        norm_eps=d.get("norm_eps", 1e-6),
        flow_shift=default_flow_shift(sample_size),
    )
    return config.replace(variant=variant_name(config))


def _config_from_mapping(data: object, source: str) -> SanaDiTConfig:
    """A config from a diffusers `config.json` or a `SanaDiTConfig.to_dict()` mapping read from `source`,
    its values checked against sane bounds before anything is built from it."""
    if not isinstance(data, dict):
        raise SanaCheckpointError(f"{source}: not a SANA DiT config (a JSON {type(data).__name__}, not an object)")
    if "num_layers" in data or "_class_name" in data:
        return config_from_diffusers(data, source)
    check_config_values(source, data, _BOUNDS, optional=_OPTIONAL)
    unknown = sorted(set(data) - set(SanaDiTConfig.__dataclass_fields__))
    if unknown:
        raise SanaCheckpointError(f"{source}: unknown SanaDiTConfig fields {preview(unknown)}")
    try:
        config = SanaDiTConfig.from_dict(data)
    except (TypeError, ValueError) as e:  # SanaInputError is a ValueError
        raise SanaCheckpointError(f"{source}: not a valid SANA DiT config: {e}") from e
    check_config_values(source, config.to_dict(), _BOUNDS, optional=_OPTIONAL)
    return config


def _config_from_argument(config: SanaDiTConfig | dict | str, presets: Mapping[str, SanaDiTConfig]) -> SanaDiTConfig:
    if isinstance(config, SanaDiTConfig):
        return config
    if isinstance(config, str):
        if config in presets:
            return presets[config]
        path = Path(config)
        if not path.is_file():
            raise SanaInputError(f"config={config!r} is neither a preset ({sorted(presets)}) nor a JSON file")
        return _config_from_mapping(read_json_file(path, "SANA DiT config"), str(path))
    if isinstance(config, dict):
        try:
            return _config_from_mapping(config, "config=")
        except SanaCheckpointError as e:  # the caller's value, not a file
            raise SanaInputError(str(e)) from None
    raise SanaInputError(f"config must be a SanaDiTConfig, dict, preset name or JSON path, got {type(config).__name__}")


def resolve_config(
    reader: CheckpointReader,
    layout: Layout,
    config: SanaDiTConfig | dict | str | None = None,
    *,
    presets: Mapping[str, SanaDiTConfig] = DIT_PRESETS,
    infer: Callable[[CheckpointReader, Layout], tuple[SanaDiTConfig, list[str]]] | None = None,
) -> SanaDiTConfig:
    """The config to build: `config=` first (an object, a name from `presets`, a mapping or a JSON
    path), then one stored with the weights, then a diffusers `config.json`, then shapes (`infer`,
    by default `infer_config`). When the stored one and `config.json` disagree, a warning says so."""
    if config is not None:
        return _config_from_argument(config, presets)
    stored = _stored_config(reader)
    from_json = None
    if reader.config is not None:
        json_source = f"{reader.path / 'config.json'}"
        if stored is None:
            return _config_from_mapping(reader.config, json_source)
        try:
            from_json = _config_from_mapping(reader.config, json_source)
        except SanaCheckpointError as e:
            warnings.warn(f"{e}; using the config stored in the weights ('{CONFIG_METADATA_KEY}' metadata)", stacklevel=3)
    if stored is not None:
        if from_json is not None:
            warn_on_config_conflict(
                reader.path, CONFIG_METADATA_KEY, diffusers_config(stored), diffusers_config(from_json), stacklevel=3
            )
        return stored
    inferred, notes = (infer or infer_config)(reader, layout)
    for note in notes:
        warnings.warn(f"{reader.path}: {note}", stacklevel=3)
    return inferred


def _stored_config(reader: CheckpointReader) -> SanaDiTConfig | None:
    found = stored_config(reader, CONFIG_METADATA_KEY)
    return None if found is None else _config_from_mapping(*found)


# --------------------------------------------------------------------------------------------
# Load / save
# --------------------------------------------------------------------------------------------


def load_dit(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    config: SanaDiTConfig | dict | str | None = None,
    ema: bool = False,
) -> SanaDiT:
    """Load a SANA DiT from any official layout (see the module docstring), in eval mode.

    `dtype=None` keeps the stored dtype (the one holding most of the weights, should a few
    tensors be stored in another). `config` (a `SanaDiTConfig`, a preset name from
    `DIT_PRESETS`, a diffusers config dict or a JSON path) overrides what is stored or detected.
    `ema=True` loads the `state_dict_ema` weights of a checkpoint written by NVlabs' training
    code instead of its `state_dict` (the weights NVlabs' inference loads, and the default).
    Raises `SanaCheckpointError` naming the file and every missing, unexpected or misshapen key.
    """
    entry = EMA_WEIGHTS_ENTRY if ema else None
    reader = strip_prefix(open_checkpoint(path, subfolders=("transformer",), entry=entry), COMFY_PREFIXES)
    if holds_controlnet(reader):
        raise SanaCheckpointError(
            f"{reader.path}: is a SANA ControlNet, not a DiT: load it with sana.load_controlnet (in ComfyUI: the "
            "Sana ControlNet Loader, from models/controlnet) and load the DiT it controls separately"
        )
    # W8A8 checkpoints (int8 weights + scales, sana/quant) carry a metadata marker; they have their own reader.
    if W8A8_METADATA_KEY in reader.metadata:
        return load_w8a8_dit(reader, resolve_config(reader, "official", config), dtype=dtype, device=device)
    layout = detect_layout(reader)
    cfg = resolve_config(reader, layout, config)
    specs = key_specs(cfg, layout)
    expected = layout_shapes(specs)
    found = {key: reader.shape(key) for key in reader.keys()}
    ignored = (lambda k: k in OFFICIAL_EXTRA_KEYS) if layout == "official" else (lambda k: False)
    check_keys(reader.path, expected, found, ignored=ignored)

    dtype = dtype or dominant_float_dtype(reader, expected)
    with torch.device("meta"):
        model = SanaDiT(cfg)
    assign_state(model, ((spec.name, read_spec(reader, spec)) for spec in specs), dtype=dtype, device=device,
                 source=reader.path)
    if layout == "official":
        model.official_extras = {k: reader.read(k) for k in OFFICIAL_EXTRA_KEYS[1:] if k in reader}
    return model.eval()


def load_w8a8(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    config: SanaDiTConfig | dict | str | None = None,
) -> SanaDiT:
    """`load_dit` for a W8A8 checkpoint (`sana.save_w8a8`) only: raises `SanaCheckpointError`
    for any other file. `dtype` applies to the float tensors; int8 weights and fp32 scales keep theirs."""
    reader = strip_prefix(open_checkpoint(path), COMFY_PREFIXES)
    if W8A8_METADATA_KEY not in reader.metadata:
        raise SanaCheckpointError(f"{reader.path}: not a W8A8 checkpoint (no '{W8A8_METADATA_KEY}' metadata)")
    return load_w8a8_dit(reader, resolve_config(reader, "official", config), dtype=dtype, device=device)


def official_pos_embed(config: SanaDiTConfig, dtype: torch.dtype) -> torch.Tensor:
    """The `pos_embed` an official file stores: the training grid's sincos table `[1, side², C]`,
    zeros for a model without positional embedding (what `official_pe` reads back)."""
    side, C = config.sample_size // config.patch_size, config.hidden_size
    if config.interpolation_scale is None:
        return torch.zeros(1, side * side, C, dtype=dtype)
    return sincos_pos_embed_2d(C, side, side, side, config.interpolation_scale)[None].to(dtype)


def dit_state_dict(model: SanaDiT, layout: Layout) -> dict[str, torch.Tensor]:
    """The model's weights under `layout`'s key names and shapes (views where possible)."""
    return layout_state(model.state_dict(), key_specs(model.config, layout))


def save_dit(
    model: SanaDiT,
    path: str | os.PathLike,
    format: Layout = "diffusers",
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write `model` in the diffusers or official layout; `load_dit` reads either back exactly.

    - `format="diffusers"`: a folder (`config.json` + `diffusion_pytorch_model.safetensors`,
      sharded with an index above `max_shard_bytes`), or a single file if `path` ends in `.safetensors`.
      A pipeline root (`model_index.json` or a `transformer/` folder) gets it in `transformer/`,
      where `load_dit` reads it. Re-saving replaces only the files of the previous save (see
      `sana.checkpoint.write_diffusers_folder`); a folder holding another model is refused.
    - `format="official"`: a `.pth` holding `{"state_dict": ...}`, or official keys in a
      `.safetensors` file. `pos_embed` (the training-grid table, zeros without PE) and
      `y_embedder.y_embedding` (the loaded one, else zeros) are written so NVlabs' and diffusers'
      converters accept the file.
    A W8A8 model (`sana.quant.quantize_w8a8`) is written as a W8A8 `.safetensors` file whatever `format`.
    Raises `SanaNonFiniteError` naming a weight that holds NaN/inf: nothing is written then.
    Writes are atomic: a failure never leaves a half-written or clobbered checkpoint.
    """
    if format not in ("diffusers", "official"):
        raise SanaInputError(f"format must be 'diffusers' or 'official', got {format!r}")
    path = Path(path)
    check_finite_weights(model.state_dict(), "the DiT")
    # A W8A8 model's int8 weights and scales fit neither layout: it has its own single-file format.
    if is_w8a8(model):
        save_w8a8(model, path)
        return
    cfg = model.config
    metadata = {CONFIG_METADATA_KEY: json.dumps(cfg.to_dict()), "format": "pt"}
    tensors = dit_state_dict(model, format)
    if format == "official":
        pos = official_pos_embed(cfg, model.dtype)
        extras = dict(getattr(model, "official_extras", {}))
        extras.setdefault("y_embedder.y_embedding", torch.zeros(300, cfg.caption_channels, dtype=model.dtype))
        tensors = {"pos_embed": pos, **tensors, **extras}
    write_layout(path, tensors, metadata, official=format == "official",
                 diffusers_config={**diffusers_config(cfg), "_diffusers_version": "0.42.1"},
                 subfolder="transformer", max_shard_bytes=max_shard_bytes)