"""Load and save DC-AE weights in the original mit-han-lab layout and in diffusers' `AutoencoderDC` layout.

Original layout (`mit-han-lab/dc-ae-*/model.safetensors`, or a `.pt` holding `state_dict`):
flat `encoder.*` / `decoder.*` keys of the efficientvit `DCAE` module, e.g.
`encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight` `[3C, C, 1, 1]`. The release
folder, as downloaded, holds that `model.safetensors` and the `config.json` huggingface_hub's
`PyTorchModelHubMixin` wrote for efficientvit's `DCAE_HF`: only `{"model_name": "dc-ae-..."}`.

Diffusers layout (`mit-han-lab/dc-ae-*-diffusers`: `config.json` +
`diffusion_pytorch_model.safetensors`, or a single file): `encoder.down_blocks.{i}.{j}...`, the
qkv conv split in thirds into `attn.to_q/to_k/to_v.weight` `[C, C]` (thirds of the interleaved
per-head q|k|v channels, not true Q, K, V) and `attn.to_out.weight` squeezed to 2-D.

The model's own names (`sana/dcae.py`) are the diffusers ones with the qkv conv fused and the
1×1 convs 4-D, so the original layout is a pure renaming (one two-way table, read both ways)
and the diffusers one the qkv split and the squeeze; `key_specs` states both as
`sana.checkpoint.KeySpec`s, as `sana.dit_io` does for the DiT.

The layout is detected from the keys; the architecture comes from, in order: the `config=`
argument, the `dcae_config` metadata that `save_dcae` writes, a diffusers `config.json`, or the
key names and shapes. The scaling factor of weights without a config is the one of the release
the hub `config.json` names (which also tells 'in' from 'mix' and sana-1.0 from 1.1), else of
the release the path names, else of the release the architecture matches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .checkpoint import (
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
    pipeline_subfolder,
    read_spec,
    shorten,
    stored_config,
    strip_prefix,
    warn_on_config_conflict,
    write_diffusers_folder,
    write_safetensors,
    write_torch,
)
from .dcae import DCAE, DCAE_PRESETS, EVIT_BLOCK, RESBLOCK, DCAEConfig, check_dcae_dtype, default_dcae_dtype
from .errors import SanaCheckpointError, SanaInputError

ORIGINAL = "original"
DIFFUSERS = "diffusers"
LAYOUTS = (ORIGINAL, DIFFUSERS)
METADATA_KEY = "dcae_config"
# One file: the largest release (f128c512) is about 1.3 GB.
_MAX_SHARD_BYTES = 10 * 1024**3
# Wrappers that other tools put around a DC-AE state dict.
_PREFIXES = ("vae.", "first_stage_model.", "ae.", "model.", "module.")

# --------------------------------------------------------------------------- key maps

# The one two-way table of names, ours <-> original mit-han-lab: prefix pairs read in either
# direction, `{n}` standing for a stage, block or branch number. A stage block's name is a
# stage pair followed by a block pair.
_TOP_NAMES = (
    ("encoder.conv_in.", "encoder.project_in.conv."),
    ("encoder.conv_out.", "encoder.project_out.main.op_list.0.conv."),
    ("decoder.conv_in.", "decoder.project_in.main.conv."),
    ("decoder.norm_out.", "decoder.project_out.op_list.0."),
    ("decoder.conv_out.", "decoder.project_out.op_list.2.conv."),
)
_STAGE_NAMES = (
    ("encoder.down_blocks.{n}.{n}.", "encoder.stages.{n}.op_list.{n}."),
    ("decoder.up_blocks.{n}.{n}.", "decoder.stages.{n}.op_list.{n}."),
)
_BLOCK_NAMES = (
    ("conv1.", "main.conv1.conv."),
    ("conv2.", "main.conv2.conv."),
    ("norm.", "main.conv2.norm."),
    ("attn.to_qkv.", "context_module.main.qkv.conv."),
    ("attn.to_qkv_multiscale.{n}.proj_in.", "context_module.main.aggreg.{n}.0."),
    ("attn.to_qkv_multiscale.{n}.proj_out.", "context_module.main.aggreg.{n}.1."),
    ("attn.to_out.", "context_module.main.proj.conv."),
    ("attn.norm_out.", "context_module.main.proj.norm."),
    ("conv_out.conv_inverted.", "local_module.main.inverted_conv.conv."),
    ("conv_out.conv_depth.", "local_module.main.depth_conv.conv."),
    ("conv_out.conv_point.", "local_module.main.point_conv.conv."),
    ("conv_out.norm.", "local_module.main.point_conv.norm."),
)
# The pixel-(un)shuffle and interpolate resamplers wrap a conv, hence the doubled `conv.conv.`;
# the stride-2 downsampler (SANA's encoder) is a bare conv. Read back, the longer name goes first.
_WRAPPED_RESAMPLER = ("conv.", "main.conv.conv.")
_PLAIN_RESAMPLER = ("conv.", "main.conv.")
_OURS_STAGE = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(\d+)\.(.+)")
_MULTISCALE = re.compile(r"attn\.to_qkv_multiscale\.(\d+)\.proj_(in|out)\.(.+)")


@functools.lru_cache(maxsize=None)
def _name_pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{n\}", r"(\d+)"))


def _swap_prefix(key: str, pairs: tuple[tuple[str, str], ...], to_original: bool) -> tuple[str, str] | None:
    """(the other side of the first pair whose one side starts `key`, the rest of `key`)."""
    for ours, original in pairs:
        source, target = (ours, original) if to_original else (original, ours)
        match = _name_pattern(source).match(key)
        if match:
            return target.replace("{n}", "{}").format(*match.groups()), key[match.end():]
    return None


def _rename(key: str, to_original: bool, plain_downsampler: bool = False) -> str | None:
    """`key` in the other naming by the table above, or None when it names nothing there."""
    top = _swap_prefix(key, _TOP_NAMES, to_original)
    if top is not None:
        return "".join(top)
    stage = _swap_prefix(key, _STAGE_NAMES, to_original)
    if stage is None:
        return None
    prefix, inner = stage
    if to_original:
        plain = plain_downsampler and key.startswith("encoder.")
        resamplers = (_PLAIN_RESAMPLER if plain else _WRAPPED_RESAMPLER,)
    else:
        resamplers = (_WRAPPED_RESAMPLER, _PLAIN_RESAMPLER)
    block = _swap_prefix(inner, _BLOCK_NAMES + resamplers, to_original)
    return None if block is None else prefix + "".join(block)


def original_name(key: str, config: DCAEConfig) -> str:
    """Our parameter name -> the original mit-han-lab name."""
    name = _rename(key, to_original=True, plain_downsampler=config.downsample_block_type == "conv")
    if name is None:
        raise SanaCheckpointError(f"internal error: no original name for DC-AE key {key!r}")
    return name


def _canonical_from_original(key: str) -> str:
    """Original name -> our name, without knowing the architecture (used to infer it)."""
    return _rename(key, to_original=False) or key


# Diffusers' names are ours, but for the qkv conv split in thirds (2-D) and `to_out` squeezed to 2-D.
_QKV = "attn.to_qkv.weight"
_QKV_THIRDS = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")
_SQUEEZED = "attn.to_out.weight"


def _model_shapes(config: DCAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = DCAE(config)
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def key_specs(config: DCAEConfig, layout: str) -> list[KeySpec]:
    """Every tensor of `DCAE(config)` (parameters and buffers) and where it lives in `layout`."""
    return list(_key_specs(config, layout))


@functools.lru_cache(maxsize=32)
def _key_specs(config: DCAEConfig, layout: str) -> tuple[KeySpec, ...]:
    if layout not in LAYOUTS:
        raise SanaCheckpointError(f"unknown DC-AE layout {layout!r} (known: {list(LAYOUTS)})")
    specs = []
    for name, shape in _model_shapes(config).items():
        if layout == ORIGINAL:
            parts = ((original_name(name, config), shape),)
        elif name.endswith(_QKV):
            base = name[: -len(_QKV)]
            parts = tuple((base + third, (shape[0] // 3, shape[1])) for third in _QKV_THIRDS)
        elif name.endswith(_SQUEEZED):
            parts = ((name, shape[:2]),)
        else:
            parts = ((name, shape),)
        specs.append(KeySpec(name, shape, parts))
    return tuple(specs)


def file_shapes(config: DCAEConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every key a checkpoint of `config` holds in `layout`, with its shape."""
    return layout_shapes(_key_specs(config, layout))


def state_in_layout(model: DCAE, layout: str) -> dict[str, torch.Tensor]:
    """The model's state dict under the names and shapes of `layout` (tensors shared where possible)."""
    return layout_state(model.state_dict(), _key_specs(model.config, layout))


def _stream_state(reader: CheckpointReader, config: DCAEConfig, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) pairs read one at a time from a checkpoint in `layout`."""
    return ((spec.name, read_spec(reader, spec)) for spec in _key_specs(config, layout))


# --------------------------------------------------------------------------- diffusers config.json

_DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": RESBLOCK,
    "decoder_block_types": RESBLOCK,
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}


def config_from_diffusers(data: Mapping, source: str = "config.json") -> DCAEConfig:
    """Our config from a diffusers `AutoencoderDC` config.json (missing fields take diffusers' defaults)."""
    if not isinstance(data, Mapping):
        raise SanaCheckpointError(f"{source}: not an AutoencoderDC config (a JSON {type(data).__name__}, not an object)")
    check_config_values(source, data, _DIFFUSERS_BOUNDS)
    cls = data.get("_class_name", "AutoencoderDC")
    if cls != "AutoencoderDC":
        raise SanaCheckpointError(f"{source}: _class_name is {cls!r}, expected 'AutoencoderDC'")
    cfg = {k: data.get(k, v) for k, v in _DIFFUSERS_DEFAULTS.items()}

    def per_stage(value):
        return (value,) * n if isinstance(value, str) else tuple(value)

    try:
        n = len(cfg["encoder_block_out_channels"])
        config = DCAEConfig(
            in_channels=int(cfg["in_channels"]),
            latent_channels=int(cfg["latent_channels"]),
            attention_head_dim=int(cfg["attention_head_dim"]),
            encoder_widths=tuple(cfg["encoder_block_out_channels"]),
            decoder_widths=tuple(cfg["decoder_block_out_channels"]),
            encoder_depths=tuple(cfg["encoder_layers_per_block"]),
            decoder_depths=tuple(cfg["decoder_layers_per_block"]),
            encoder_block_types=per_stage(cfg["encoder_block_types"]),
            decoder_block_types=per_stage(cfg["decoder_block_types"]),
            encoder_qkv_multiscales=tuple(tuple(s) for s in cfg["encoder_qkv_multiscales"]),
            decoder_qkv_multiscales=tuple(tuple(s) for s in cfg["decoder_qkv_multiscales"]),
            downsample_block_type=cfg["downsample_block_type"],
            upsample_block_type=cfg["upsample_block_type"],
            decoder_norm_types=per_stage(cfg["decoder_norm_types"]),
            decoder_act_fns=per_stage(cfg["decoder_act_fns"]),
            encoder_out_shortcut=bool(cfg["encoder_out_shortcut"]),
            decoder_in_shortcut=bool(cfg["decoder_in_shortcut"]),
            decoder_conv_act_fn=cfg["decoder_conv_act_fn"],
            scaling_factor=float(cfg["scaling_factor"]),
        )
    except SanaCheckpointError as e:
        raise SanaCheckpointError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise SanaCheckpointError(f"{source}: not a valid AutoencoderDC config: {shorten(str(e))}") from None
    _check_config(config, source)
    preset = _matching_preset(config, exact_scaling=True)
    return config.replace(name=preset) if preset else config


# Far above every release (at most 8 stages, 10 blocks a stage, 2048 wide), yet small enough
# that a config cannot make a loader spend minutes building a model on the meta device.
_MAX_STAGES = 12
_BOUNDS: dict[str, tuple[float, float]] = {
    "in_channels": (1, 64),
    "latent_channels": (1, 4096),
    "attention_head_dim": (1, 4096),
    "encoder_widths": (0, 65536),
    "decoder_widths": (0, 65536),
    "encoder_depths": (0, 64),
    "decoder_depths": (0, 64),
    "encoder_qkv_multiscales": (1, 64),
    "decoder_qkv_multiscales": (1, 64),
    "scaling_factor": (0.0, 1e6),
}
_DIFFUSERS_BOUNDS = {
    **{k: _BOUNDS[k] for k in ("in_channels", "latent_channels", "attention_head_dim", "encoder_qkv_multiscales",
                               "decoder_qkv_multiscales", "scaling_factor")},
    "encoder_block_out_channels": _BOUNDS["encoder_widths"],
    "decoder_block_out_channels": _BOUNDS["decoder_widths"],
    "encoder_layers_per_block": _BOUNDS["encoder_depths"],
    "decoder_layers_per_block": _BOUNDS["decoder_depths"],
}


def _check_config(config: DCAEConfig, source: str) -> None:
    """Refuse a config no real DC-AE has before a model is built from it (see `_BOUNDS`)."""
    check_config_values(source, dataclasses.asdict(config), _BOUNDS)
    if config.num_stages > _MAX_STAGES:
        raise SanaCheckpointError(f"{source}: {config.num_stages} stages; a DC-AE has at most {_MAX_STAGES}")


def _stored_config(reader: CheckpointReader) -> DCAEConfig | None:
    """The config `save_dcae` stored in a single file's metadata, checked."""
    found = stored_config(reader, METADATA_KEY)
    if found is None:
        return None
    data, source = found
    check_config_values(source, data, _BOUNDS)
    try:
        config = DCAEConfig.from_json(json.dumps(data))
    except (ValueError, TypeError) as e:
        raise SanaCheckpointError(f"{source} is unreadable: {shorten(str(e))}") from None
    _check_config(config, source)
    return config


def diffusers_config(config: DCAEConfig) -> dict:
    """A config.json that diffusers' `AutoencoderDC.from_pretrained` accepts for `config`."""
    return {
        "_class_name": "AutoencoderDC",
        "in_channels": config.in_channels,
        "latent_channels": config.latent_channels,
        "attention_head_dim": config.attention_head_dim,
        "encoder_block_types": list(config.encoder_block_types),
        "decoder_block_types": list(config.decoder_block_types),
        "encoder_block_out_channels": list(config.encoder_widths),
        "decoder_block_out_channels": list(config.decoder_widths),
        "encoder_layers_per_block": list(config.encoder_depths),
        "decoder_layers_per_block": list(config.decoder_depths),
        "encoder_qkv_multiscales": [list(s) for s in config.encoder_qkv_multiscales],
        "decoder_qkv_multiscales": [list(s) for s in config.decoder_qkv_multiscales],
        "upsample_block_type": config.upsample_block_type,
        "downsample_block_type": config.downsample_block_type,
        "decoder_norm_types": list(config.decoder_norm_types),
        "decoder_act_fns": list(config.decoder_act_fns),
        "encoder_out_shortcut": config.encoder_out_shortcut,
        "decoder_in_shortcut": config.decoder_in_shortcut,
        "decoder_conv_act_fn": config.decoder_conv_act_fn,
        "scaling_factor": config.scaling_factor,
    }


# --------------------------------------------------------------------------- detection


def _architecture(config: DCAEConfig) -> DCAEConfig:
    """`config` without the fields that leave no trace in the weights (name, scaling, empty stages)."""

    def blank(values: tuple, depths: tuple[int, ...], empty) -> tuple:
        return tuple(empty if depth == 0 else v for v, depth in zip(values, depths))

    enc, dec = config.encoder_depths, config.decoder_depths
    return config.replace(
        name="",
        scaling_factor=0.0,
        encoder_widths=blank(config.encoder_widths, enc, 0),
        decoder_widths=blank(config.decoder_widths, dec, 0),
        encoder_block_types=blank(config.encoder_block_types, enc, RESBLOCK),
        decoder_block_types=blank(config.decoder_block_types, dec, RESBLOCK),
        encoder_qkv_multiscales=blank(config.encoder_qkv_multiscales, enc, ()),
        decoder_qkv_multiscales=blank(config.decoder_qkv_multiscales, dec, ()),
        decoder_norm_types=blank(config.decoder_norm_types, dec, "rms_norm"),
        decoder_act_fns=blank(config.decoder_act_fns, dec, "silu"),
    )


def _matching_preset(config: DCAEConfig, exact_scaling: bool) -> str | None:
    for name, preset in DCAE_PRESETS.items():
        if _architecture(preset) == _architecture(config) and (
            not exact_scaling or abs(preset.scaling_factor - config.scaling_factor) < 1e-6
        ):
            return name
    return None


def detect_layout(reader: CheckpointReader) -> str:
    """`"original"` or `"diffusers"`, from the key names; raises for anything else."""
    keys = reader.keys()
    if any(k.startswith(("encoder.stages.", "decoder.stages.", "encoder.project_in.", "decoder.project_in.")) for k in keys):
        return ORIGINAL
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.conv_in.", "decoder.conv_in.")) for k in keys):
        return DIFFUSERS
    raise SanaCheckpointError(
        f"{reader.path}: unknown layout: not a DC-AE checkpoint in the original (encoder.stages.*) or diffusers "
        f"(encoder.down_blocks.*) layout; first keys: {sorted(keys)[:8]}"
    )


def _canonical_shapes(reader: CheckpointReader, layout: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for key in reader.keys():
        shape = reader.shape(key)
        if layout == ORIGINAL:
            shapes[_canonical_from_original(key)] = shape
        elif key.endswith(_QKV_THIRDS[0]) and len(shape) == 2:
            shapes[key[: -len(_QKV_THIRDS[0])] + _QKV] = (3 * shape[0], shape[1], 1, 1)
        elif key.endswith(_SQUEEZED) and len(shape) == 2:
            shapes[key] = (*shape, 1, 1)
        else:
            shapes[key] = shape
    return shapes


def _infer_config(shapes: Mapping[str, tuple[int, ...]]) -> DCAEConfig:
    """The architecture implied by our-named key shapes; KeyError/ValueError when it cannot be told."""
    stage_keys: dict[tuple[str, int], dict[int, set[str]]] = {}
    for key in shapes:
        match = _OURS_STAGE.fullmatch(key)
        if match:
            side, _, stage, index, inner = match.groups()
            stage_keys.setdefault((side, int(stage)), {}).setdefault(int(index), set()).add(inner)
    if not stage_keys:
        raise ValueError("no stage keys")
    num_stages = 1 + max(stage for _, stage in stage_keys)
    if num_stages > _MAX_STAGES:
        raise ValueError(f"stage {num_stages - 1} (a DC-AE has at most {_MAX_STAGES} stages)")
    latent = shapes["encoder.conv_out.weight"][0]
    in_conv = shapes.get("encoder.conv_in.weight") or shapes["encoder.conv_in.conv.weight"]
    head_dims = {shape[1] for key, shape in shapes.items() if _MULTISCALE.search(key) and ".proj_out." in key}
    if len(head_dims) > 1:
        raise ValueError(f"inconsistent attention head dims {sorted(head_dims)}")
    head_dim = head_dims.pop() if head_dims else 32
    fields: dict = {}
    for side in ("encoder", "decoder"):
        widths, depths, kinds, scales, norms = [], [], [], [], []
        for stage in range(num_stages):
            blocks = stage_keys.get((side, stage), {})
            resampler = None
            if side == "encoder" and blocks and "conv.weight" in blocks[max(blocks)]:
                resampler = max(blocks)
            if side == "decoder" and blocks and "conv.weight" in blocks.get(0, ()):
                resampler = 0
            body = sorted(j for j in blocks if j != resampler)
            expected_indices = list(range(1, len(body) + 1)) if side == "decoder" and resampler == 0 else list(range(len(body)))
            if body != expected_indices:
                raise ValueError(f"{side} stage {stage} has block indices {body}")
            prefix = f"{side}.{'down_blocks' if side == 'encoder' else 'up_blocks'}.{stage}."
            depths.append(len(body))
            if not body:
                widths.append(0)  # filled in from the next stage below
                kinds.append(None)
                scales.append(())
                norms.append(None)
                continue
            first = f"{prefix}{body[0]}."
            if "attn.to_qkv.weight" in blocks[body[0]]:
                kinds.append(EVIT_BLOCK)
                widths.append(shapes[first + "attn.to_qkv.weight"][1])
                branches = sorted(int(m.group(1)) for inner in blocks[body[0]] if (m := _MULTISCALE.fullmatch(inner)))
                scales.append(tuple(shapes[f"{first}attn.to_qkv_multiscale.{b}.proj_in.weight"][-1] for b in sorted(set(branches))))
                bn = "attn.norm_out.running_mean" in blocks[body[0]]
            else:
                kinds.append(RESBLOCK)
                widths.append(shapes[first + "conv1.weight"][0])
                scales.append(())
                bn = "norm.running_mean" in blocks[body[0]]
            norms.append("batch_norm" if bn else "rms_norm")
            if resampler is not None:
                out_channels = shapes[f"{prefix}{resampler}.conv.weight"][0]
                # The resampler's conv width tells its kind: C_out (stride-2 / interpolate) or
                # C_out/4 (pixel-unshuffle) or 4·C_out (pixel-shuffle); compared once widths are known.
                fields.setdefault("down_probe" if side == "encoder" else "up_probe", (stage, out_channels))
        fields[side] = (widths, depths, kinds, scales, norms)
    enc_widths, dec_widths = fields["encoder"][0], fields["decoder"][0]
    for widths, _, kinds, _, norms in (fields["encoder"], fields["decoder"]):
        for i in range(num_stages - 2, -1, -1):
            if widths[i] == 0:
                # An empty stage has no weights of its own: like the releases, half the next
                # width and the next stage's block type and norm.
                widths[i] = widths[i + 1] // 2
                kinds[i] = kinds[i + 1]
                norms[i] = norms[i + 1]
    if "down_probe" in fields:
        stage, out_channels = fields["down_probe"]
        downsample = "pixel_unshuffle" if out_channels * 4 == enc_widths[stage + 1] else "conv"
    else:
        downsample = "pixel_unshuffle" if in_conv[0] * 4 == enc_widths[1] else "conv"
    if "up_probe" in fields:
        stage, out_channels = fields["up_probe"]
        upsample = "interpolate" if out_channels == dec_widths[stage] else "pixel_shuffle"
    else:
        upsample = "interpolate"
    dec_norms = fields["decoder"][4]
    return DCAEConfig(
        in_channels=in_conv[1],
        latent_channels=latent,
        attention_head_dim=head_dim,
        encoder_widths=tuple(enc_widths),
        decoder_widths=tuple(dec_widths),
        encoder_depths=tuple(fields["encoder"][1]),
        decoder_depths=tuple(fields["decoder"][1]),
        encoder_block_types=tuple(fields["encoder"][2]),
        decoder_block_types=tuple(fields["decoder"][2]),
        encoder_qkv_multiscales=tuple(fields["encoder"][3]),
        decoder_qkv_multiscales=tuple(fields["decoder"][3]),
        downsample_block_type=downsample,
        upsample_block_type=upsample,
        decoder_norm_types=tuple(dec_norms),
        # Activations leave no trace in the weights; every release pairs BatchNorm with ReLU.
        decoder_act_fns=tuple("relu" if n == "batch_norm" else "silu" for n in dec_norms),
        scaling_factor=1.0,
    )


_IN_OR_MIX = re.compile(r"-(in|mix)-")
_SANA_VERSION = re.compile(r"sana-(1\.[01])")


def _closest_preset(found: Mapping[str, tuple[int, ...]], layout: str) -> tuple[str, float]:
    best, best_score = "", 0.0
    for name, preset in DCAE_PRESETS.items():
        expected = file_shapes(preset, layout)
        score = sum(1 for k, s in expected.items() if found.get(k) == s) / len(expected)
        if score > best_score:
            best, best_score = name, score
    return best, best_score


def resolve_config(
    reader: CheckpointReader, layout: str, config: DCAEConfig | str | None = None
) -> DCAEConfig:
    """The architecture and scaling factor of the checkpoint in `reader` (see the module docstring)."""
    path = reader.path
    if isinstance(config, str):
        if config not in DCAE_PRESETS:
            raise SanaInputError(f"unknown DC-AE preset {config!r} (known: {sorted(DCAE_PRESETS)})")
        return DCAE_PRESETS[config]
    if isinstance(config, DCAEConfig):
        return config
    if config is not None:
        raise SanaCheckpointError(f"config= must be a DCAEConfig or a preset name, got {type(config).__name__}")
    stored = _stored_config(reader)
    release = _hub_release_name(reader.config)
    if reader.config is not None and release is None:
        try:
            from_json = config_from_diffusers(reader.config, f"{path}/config.json")
        except SanaCheckpointError as e:
            if stored is None:
                raise
            warnings.warn(f"{e}; using the config stored in the weights ('{METADATA_KEY}' metadata)", stacklevel=4)
        else:
            if stored is not None:
                warn_on_config_conflict(path, METADATA_KEY, diffusers_config(stored), diffusers_config(from_json), stacklevel=4)
            return stored or from_json
    if stored is not None:
        return stored
    return _config_from_weights(reader, layout, release)


def _hub_release_name(config: Mapping | None) -> str | None:
    """The release a `config.json` of the original layout names: efficientvit's `DCAE_HF` is
    saved by huggingface_hub's `PyTorchModelHubMixin`, which writes only its constructor
    argument, `{"model_name": "dc-ae-f32c32-sana-1.1"}`. None for any other config."""
    if not isinstance(config, Mapping) or "_class_name" in config:
        return None
    name = config.get("model_name")
    return name if isinstance(name, str) else None


def _config_from_weights(reader: CheckpointReader, layout: str, release: str | None) -> DCAEConfig:
    """The architecture the key names and shapes imply, with the scaling factor of the release
    `release` (a hub config's `model_name`) or the path names, else of the release it matches."""
    path = reader.path
    named = DCAE_PRESETS.get(release) if release else None
    found = {k: reader.shape(k) for k in reader.keys()}
    preset_name, score = _closest_preset(found, layout)
    try:
        inferred = _infer_config(_canonical_shapes(reader, layout))
    except (KeyError, ValueError, IndexError, SanaCheckpointError) as e:
        if named is not None or score >= 0.5:
            # A damaged release: list what is wrong against the release it names or resembles.
            check_keys(path, file_shapes(named or DCAE_PRESETS[preset_name], layout), found)
        raise SanaCheckpointError(f"{path}: unknown DC-AE layout: cannot work out the architecture from the keys ({e}); "
                                  f"pass config= (a DCAEConfig or one of {sorted(DCAE_PRESETS)})") from None
    if named is not None:
        if _architecture(named) == _architecture(inferred):
            return named
        warnings.warn(
            f"{path}: config.json names the release {release}, but the weights have another architecture; "
            f"using the weights' architecture with that release's scaling_factor {named.scaling_factor} "
            "(pass config= to choose)",
            stacklevel=4,
        )
        return inferred.replace(scaling_factor=named.scaling_factor)
    match = _matching_preset(inferred, exact_scaling=False)
    if match is None:
        if score >= 0.9:
            check_keys(path, file_shapes(DCAE_PRESETS[preset_name], layout), found)
        warnings.warn(
            f"{path}: a DC-AE of no released architecture and no stored config; scaling_factor is unknown and set "
            f"to 1.0 (pass config= to set it)",
            stacklevel=4,
        )
        return inferred
    hint = release or Path(path).as_posix()  # the names that tell releases of one architecture apart
    if "sana" in match:
        version = _SANA_VERSION.search(hint)
        return DCAE_PRESETS[f"dc-ae-f32c32-sana-{version.group(1)}" if version else match]
    in_or_mix = _IN_OR_MIX.search(hint + "-")
    family = match.replace("-in-", "-mix-")
    if in_or_mix:
        return DCAE_PRESETS[family.replace("-mix-", f"-{in_or_mix.group(1)}-")]
    chosen = DCAE_PRESETS[family]
    warnings.warn(
        f"{path}: the 'in' and 'mix' releases of {family.replace('-mix-', '-{in,mix}-')} cannot be told apart from "
        f"the weights; assuming 'mix' (scaling_factor {chosen.scaling_factor}). Pass "
        f"config={family.replace('-mix-', '-in-')!r} for the ImageNet-only release.",
        stacklevel=4,
    )
    return chosen


def validate_checkpoint(reader: CheckpointReader, config: DCAEConfig | str | None = None) -> tuple[str, DCAEConfig]:
    """(layout, config) of a checkpoint, after checking every key and shape; reads no tensor data."""
    layout = detect_layout(reader)
    resolved = resolve_config(reader, layout, config)
    check_keys(reader.path, file_shapes(resolved, layout), {k: reader.shape(k) for k in reader.keys()})
    return layout, resolved


# --------------------------------------------------------------------------- public API


def load_dcae(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    config: DCAEConfig | str | None = None,
) -> DCAE:
    """Load a DC-AE from any released layout, ready for inference (eval mode).

    `path`: an original mit-han-lab `model.safetensors` (flat `encoder.*`/`decoder.*` keys), a
    `.pt`/`.pth` holding `state_dict`, a diffusers `AutoencoderDC` folder (`config.json` + weights,
    sharded or not; a pipeline root with a `vae/` folder works too) or a single diffusers-layout file.
    `dtype`: cast floating-point weights to it. Default: the checkpoint's own dtype, except that
    float16 weights load in `default_dcae_dtype(device)` (bf16 on an accelerator, fp32 on the CPU),
    because the DC-AE overflows in fp16. An explicit float16 raises `SanaInputError`; to store
    fp16 weights, pass `dtype=` to `save_dcae` instead.
    `config`: a `DCAEConfig` or preset name (see `DCAE_PRESETS`) overriding detection, e.g. to say
    'in' rather than 'mix' for the f32c32/f64c128/f128c512 weights, which are indistinguishable.

    Raises `SanaCheckpointError` (before building anything) for a missing, unreadable, truncated or
    unknown file, and lists every missing or unexpected key and every wrong shape.
    """
    check_dcae_dtype(dtype)
    reader = strip_prefix(open_checkpoint(path, subfolders=("vae",)), _PREFIXES)
    layout, resolved = validate_checkpoint(reader, config)
    with torch.device("meta"):
        model = DCAE(resolved)
    assign_state(model, _stream_state(reader, resolved, layout), dtype=dtype or _load_dtype(reader, device), device=device,
                 source=reader.path)
    return model.eval()


def _load_dtype(reader: CheckpointReader, device: torch.device | str) -> torch.dtype | None:
    """The checkpoint's own float dtype, or the safe compute dtype in place of float16."""
    stored = dominant_float_dtype(reader)
    return default_dcae_dtype(device) if stored == torch.float16 else stored


def stored_dcae_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The float dtype most of a DC-AE checkpoint's tensors are stored in (headers only)."""
    return dominant_float_dtype(strip_prefix(open_checkpoint(path, subfolders=("vae",)), _PREFIXES))


def save_dcae(
    model: DCAE,
    path: str | os.PathLike,
    *,
    layout: str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write `model` in the `"original"` or `"diffusers"` layout.

    Default layout: `"diffusers"` when `path` has no file suffix (a folder holding `config.json` +
    `diffusion_pytorch_model.safetensors`, loadable by `AutoencoderDC.from_pretrained`), else
    `"original"` (`.safetensors`, or `.pt`/`.pth` with a `state_dict` entry). Single files also carry
    the config as `dcae_config` metadata, so `load_dcae` restores the exact architecture and scaling
    factor. Writes are atomic. `dtype` casts floating-point tensors. A pipeline root
    (`model_index.json` or a `vae/` folder) gets the folder in `vae/`, where `load_dcae` reads it;
    re-saving a folder replaces only the files of the previous save, and a folder holding
    another model is refused (`sana.checkpoint.write_diffusers_folder`). Raises
    `SanaNonFiniteError` naming a weight that holds NaN/inf (as stored): nothing is written then.
    """
    path = Path(path)
    is_file = path.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
    layout = layout or (ORIGINAL if is_file else DIFFUSERS)
    if layout not in LAYOUTS:
        raise SanaCheckpointError(f"{path}: unknown DC-AE layout {layout!r} (known: {list(LAYOUTS)})")
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
        for k, v in state_in_layout(model, layout).items()
    }
    check_finite_weights(state, "the DC-AE")  # after the cast: a narrower dtype can overflow to inf
    metadata = {"format": "pt", METADATA_KEY: model.config.to_json()}
    if not is_file:
        if layout != DIFFUSERS:
            raise SanaCheckpointError(f"{path}: the original layout is a single file; give a .safetensors or .pt path")
        write_diffusers_folder(
            pipeline_subfolder(path, "vae"), state, diffusers_config(model.config),
            metadata={"format": "pt"}, max_shard_bytes=_MAX_SHARD_BYTES,
        )
    elif path.suffix.lower() == ".safetensors":
        write_safetensors(path, state, metadata)
    else:
        write_torch(path, {"state_dict": state, METADATA_KEY: model.config.to_json()})
