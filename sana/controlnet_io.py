"""Reading and writing SANA ControlNet checkpoints: `load_controlnet`, `save_controlnet`.

Layouts:
- **official** (NVlabs, e.g. `Sana_1600M_1024px_BF16_ControlNet_HED.pth`): weights under
  `state_dict` (or bare), as NVlabs' `SanaMSControlNet` saves them. The released files hold the
  whole model: the base DiT's keys (`blocks.{i}.*`, `final_layer.*`, `pos_embed`, ...) and the
  ControlNet's `controlnet.{k}.copied_block.*`, `controlnet.0.before_proj.*` and
  `controlnet.{k}.after_proj.*`; the ControlNet shares the base's input side (`x_embedder`,
  `t_embedder`, `t_block`, `y_embedder.y_proj`, `attention_y_norm`). The loader reads the
  ControlNet's part and ignores the base blocks (load the DiT from its own release).
- **diffusers**: a `SanaControlNetModel` folder (`config.json` + safetensors, sharded with an
  index too, or a `SanaControlNetPipeline` root with `controlnet/`), or a single safetensors file.

The key table is the DiT's (`sana.dit_io.key_specs`) without the final layer, with NVlabs'
`controlnet.{k}.copied_block.` in place of `blocks.{k}.`, plus the two kinds of projections.
The variant is detected from the weights as for the DiT (width, copied-block count, caption
channels, QK norm, and for official files the stored `pos_embed`); `config=` overrides it.
A DiT given here, or a ControlNet given to `load_dit`, is refused with a message saying which
loader reads it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    CONFIG_METADATA_KEY,
    CheckpointReader,
    KeySpec,
    assign_state,
    check_finite_weights,
    check_keys,
    dominant_float_dtype,
    layout_shapes,
    layout_state,
    open_checkpoint,
    read_spec,
    strip_prefix,
    write_layout,
)
from .controlnet import CONTROLNET_PRESETS, SanaControlNet, controlnet_variant_name
from .dit import SanaDiTConfig, default_flow_shift
from .dit_io import (
    COMFY_PREFIXES,
    CONTROLNET_MARKERS,
    DEFAULT_MAX_SHARD_BYTES,
    KNOWN_CROSS_HEADS,
    OFFICIAL_EXTRA_KEYS,
    Layout,
    diffusers_config,
    official_pe,
    official_pos_embed,
    resolve_config,
)
from .dit_io import detect_layout as detect_dit_layout
from .dit_io import key_specs as dit_key_specs
from .errors import SanaCheckpointError, SanaInputError

DIFFUSERS_CLASS = "SanaControlNetModel"
# The base DiT's keys in a released official file: the ControlNet loader reads past them.
_OFFICIAL_BASE_PREFIXES = ("blocks.", "final_layer.")
_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.")
# diffusers config.json fields of SanaTransformer2DModel that SanaControlNetModel does not have.
_DIT_ONLY_FIELDS = ("guidance_embeds", "guidance_embeds_scale", "timestep_scale")


def key_specs(config: SanaDiTConfig, layout: Layout) -> list[KeySpec]:
    """Every parameter of `SanaControlNet(config)` and where it lives in `layout`."""
    official = layout == "official"
    specs: list[KeySpec] = []
    for spec in dit_key_specs(config, layout):
        if spec.name.startswith("final_layer."):
            continue
        if official and spec.name.startswith("blocks."):
            parts = tuple((_OFFICIAL_BLOCK.sub(r"controlnet.\1.copied_block.", key, count=1), shape) for key, shape in spec.parts)
            spec = KeySpec(spec.name, spec.shape, parts)
        specs.append(spec)
    C = config.hidden_size

    def linear(ours: str, theirs: str) -> None:
        specs.append(KeySpec(f"{ours}.weight", (C, C), ((f"{theirs}.weight", (C, C)),)))
        specs.append(KeySpec(f"{ours}.bias", (C,), ((f"{theirs}.bias", (C,)),)))

    linear("input_proj", "controlnet.0.before_proj" if official else "input_block")
    for k in range(config.depth):
        linear(f"output_projs.{k}", f"controlnet.{k}.after_proj" if official else f"controlnet_blocks.{k}")
    return specs


# --------------------------------------------------------------------------------------------
# Detection


def detect_layout(reader: CheckpointReader) -> Layout:
    """The layout of a ControlNet checkpoint; a DiT, or anything else, is refused by name."""
    for layout, marker in CONTROLNET_MARKERS.items():
        if marker in reader:
            return layout
    try:
        detect_dit_layout(reader)
    except SanaCheckpointError:
        sample = sorted(reader.keys())[:8]
        raise SanaCheckpointError(
            f"{reader.path}: not a SANA ControlNet: none of its keys is NVlabs' "
            f"'{CONTROLNET_MARKERS['official']}' or diffusers' '{CONTROLNET_MARKERS['diffusers']}'; first keys: {sample}"
        ) from None
    raise SanaCheckpointError(
        f"{reader.path}: is a SANA DiT, not a ControlNet: load it with sana.load_dit (in ComfyUI: the Sana DiT "
        "Loader); a ControlNet file holds 'controlnet.N.*' (NVlabs) or 'input_block' / 'controlnet_blocks.N' (diffusers) keys"
    )


@functools.lru_cache(maxsize=2)
def _layout_names(layout: Layout) -> dict[str, str]:
    """Our parameter name -> its (first) key in `layout`, for one block with every optional part."""
    probe = SanaDiTConfig(depth=1, qk_norm=True)
    return {spec.name: spec.parts[0][0] for spec in key_specs(probe, layout)}


def infer_config(reader: CheckpointReader, layout: Layout) -> tuple[SanaDiTConfig, list[str]]:
    """A config from tensor shapes and keys, plus notes on what the weights could not tell."""
    names = _layout_names(layout)
    notes: list[str] = []

    def shape(ours: str) -> tuple[int, ...]:
        key = names[ours]
        if key not in reader:
            raise SanaCheckpointError(f"{reader.path}: missing key {key!r}, needed to detect the ControlNet variant")
        return reader.shape(key)

    hidden, in_channels, p, _ = shape("x_embedder.proj.weight")
    if hidden not in KNOWN_CROSS_HEADS:
        raise SanaCheckpointError(
            f"{reader.path}: hidden size {hidden} is not a released SANA width (1152, 2240) and the file carries "
            "no config; the attention head counts cannot be read from weights: pass config="
        )
    block_prefix = names["blocks.0.scale_shift_table"].removesuffix("0.scale_shift_table")
    depth = len({key[len(block_prefix):].split(".")[0] for key in reader.keys() if key.startswith(block_prefix)})
    cross_heads, cross_dim = KNOWN_CROSS_HEADS[hidden]
    fields: dict[str, Any] = dict(
        hidden_size=hidden,
        depth=depth,
        cross_attention_heads=cross_heads,
        cross_attention_head_dim=cross_dim,
        caption_channels=shape("y_embedder.y_proj.fc1.weight")[1],
        in_channels=in_channels,
        out_channels=in_channels,
        patch_size=p,
        mlp_ratio=(shape("blocks.0.mlp.inverted_conv.weight")[0] // 2) / hidden,
        qk_norm=names["blocks.0.attn.q_norm.weight"] in reader,
    )
    if layout == "official":
        side, scale = official_pe(reader, hidden)
        fields["sample_size"], fields["interpolation_scale"] = side or 32, scale
    else:
        notes.append(
            "a bare diffusers ControlNet file carries no training size: assuming 1024px without positional "
            "embedding, as the released ControlNets; pass config= for another"
        )
    config = SanaDiTConfig(**fields)
    config = config.replace(flow_shift=default_flow_shift(config.sample_size))
    return config.replace(variant=controlnet_variant_name(config)), notes


# --------------------------------------------------------------------------------------------
# Load / save


def load_controlnet(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    config: SanaDiTConfig | dict | str | None = None,
) -> SanaControlNet:
    """Load a SANA ControlNet from the official NVlabs file as released or a diffusers
    `SanaControlNetModel` folder or file (see the module docstring), in eval mode.

    `dtype=None` keeps the stored dtype (the one holding most of the ControlNet's weights).
    `config` (a `SanaDiTConfig` whose depth is the copied-block count, a name from
    `CONTROLNET_PRESETS`, a diffusers config dict or a JSON path) overrides what is stored or
    detected. Raises `SanaCheckpointError` naming the file and every missing, unexpected or
    misshapen key, and for a DiT checkpoint (which `sana.load_dit` reads).
    """
    reader = strip_prefix(open_checkpoint(path, subfolders=("controlnet",)), COMFY_PREFIXES)
    layout = detect_layout(reader)
    cfg = resolve_config(reader, layout, config, presets=CONTROLNET_PRESETS, infer=infer_config)
    if cfg.variant not in CONTROLNET_PRESETS:
        cfg = cfg.replace(variant=controlnet_variant_name(cfg))
    if cfg.guidance_embeds:
        raise SanaCheckpointError(f"{reader.path}: its config has a guidance embedding (SANA-Sprint); a ControlNet has none")
    specs = key_specs(cfg, layout)
    expected = layout_shapes(specs)
    found = {key: reader.shape(key) for key in reader.keys()}

    def ignored(key: str) -> bool:  # the base DiT's part of a released official file
        return layout == "official" and (key in OFFICIAL_EXTRA_KEYS or key.startswith(_OFFICIAL_BASE_PREFIXES))

    check_keys(reader.path, expected, found, ignored=ignored)
    dtype = dtype or dominant_float_dtype(reader, expected)
    with torch.device("meta"):
        model = SanaControlNet(cfg)
    assign_state(model, ((spec.name, read_spec(reader, spec)) for spec in specs), dtype=dtype, device=device,
                 source=reader.path)
    return model.eval()


def diffusers_controlnet_config(config: SanaDiTConfig) -> dict[str, Any]:
    """The `config.json` diffusers' `SanaControlNetModel` reads for `config` (`qk_norm` only when set:
    diffusers' ControlNet has none, so such a folder reads back here, through its stored config)."""
    data = {key: value for key, value in diffusers_config(config).items() if key not in _DIT_ONLY_FIELDS}
    if data["qk_norm"] is None:
        del data["qk_norm"]
    return {**data, "_class_name": DIFFUSERS_CLASS}


def controlnet_state_dict(model: SanaControlNet, layout: Layout) -> dict[str, torch.Tensor]:
    """The ControlNet's weights under `layout`'s key names and shapes (views where possible)."""
    return layout_state(model.state_dict(), key_specs(model.config, layout))


def save_controlnet(
    model: SanaControlNet,
    path: str | os.PathLike,
    format: Layout = "diffusers",
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write `model` in the diffusers or official layout; `load_controlnet` reads either back exactly.

    - `format="diffusers"`: a `SanaControlNetModel` folder (`config.json` + safetensors, sharded
      above `max_shard_bytes`; a pipeline root gets it in `controlnet/`), or a single file if
      `path` ends in `.safetensors`.
    - `format="official"`: a `.pth` holding `{"state_dict": ...}` (or a `.safetensors`) with NVlabs'
      key names for the ControlNet's part and `pos_embed`; not the base DiT's blocks, which the
      released files also carry (save the DiT with `sana.save_dit`).
    Raises `SanaNonFiniteError` naming a weight that holds NaN/inf: nothing is written then.
    Writes are atomic: a failure never leaves a half-written or clobbered checkpoint.
    """
    if format not in ("diffusers", "official"):
        raise SanaInputError(f"format must be 'diffusers' or 'official', got {format!r}")
    check_finite_weights(model.state_dict(), "the ControlNet")
    cfg = model.config
    metadata = {CONFIG_METADATA_KEY: json.dumps(cfg.to_dict()), "format": "pt"}
    tensors = controlnet_state_dict(model, format)
    if format == "official":
        tensors = {"pos_embed": official_pos_embed(cfg, model.dtype), **tensors}
    write_layout(Path(path), tensors, metadata, official=format == "official",
                 diffusers_config={**diffusers_controlnet_config(cfg), "_diffusers_version": "0.42.1"},
                 subfolder="controlnet", max_shard_bytes=max_shard_bytes)

__all__ = [
    "controlnet_state_dict",
    "detect_layout",
    "diffusers_controlnet_config",
    "infer_config",
    "key_specs",
    "load_controlnet",
    "save_controlnet",
]
