"""W8A8 DiT checkpoints: one safetensors file with int8 weights, fp32 scales and a metadata marker.

Keys are the quantized model's own state-dict names (the official SANA names, with 2-D 1×1
conv weights): a W8A8 layer `blocks.0.attn.qkv` stores `.weight` (int8), `.weight_scale` (fp32)
and `.bias` if it has one; every other tensor is stored as in the float model. The metadata
holds the DiT config (`sana_dit_config`, as `save_dit` writes it) and `sana_w8a8`, a JSON record
of the format version and of each converted layer with its mode, so loading rebuilds exactly
the saved structure whatever `keep` / `weight_only` were.

`sana.load_dit` (and `sana.load_w8a8`) recognise the marker, resolve the config as for any DiT
file and hand both to `load_w8a8_dit`; this module never imports `sana.dit_io`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoint import (
    CONFIG_METADATA_KEY,
    CheckpointReader,
    assign_state,
    check_keys,
    dominant_float_dtype,
    preview,
    shorten,
    write_safetensors,
)
from ..dit import SanaDiT, SanaDiTConfig
from ..errors import SanaCheckpointError, SanaInputError
from .model import W8A8Linear, apply_plan, is_w8a8

W8A8_METADATA_KEY = "sana_w8a8"
W8A8_FORMAT_VERSION = 1
# Tensors that keep their stored dtype whatever `dtype=` asks: the dequantization scales are
# fp32 by design (a bf16 scale would bias a whole output channel by up to 0.4%).
_SCALE_SUFFIX = ".weight_scale"


def save_w8a8(model: SanaDiT, path: str | os.PathLike) -> None:
    """Write a W8A8-quantized DiT to a `.safetensors` file (atomically)."""
    if not is_w8a8(model):
        raise SanaInputError("save_w8a8 needs a model from sana.quantize_w8a8 (or a loaded W8A8 checkpoint)")
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SanaInputError(f"W8A8 checkpoints are single .safetensors files, got {path.name!r}")
    record = {"version": W8A8_FORMAT_VERSION, "layers": {name: ("w8a8" if act else "weight_only") for name, act in model.w8a8_plan.items()}}
    metadata = {
        CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()),
        W8A8_METADATA_KEY: json.dumps(record),
        "format": "pt",
    }
    write_safetensors(path, model.state_dict(), metadata)


def _plan_from_metadata(reader: CheckpointReader) -> dict[str, bool]:
    try:
        record = json.loads(reader.metadata[W8A8_METADATA_KEY])
        version, layers = record["version"], record["layers"]
        if not isinstance(layers, dict):
            raise TypeError(f"'layers' is a {type(layers).__name__}, not an object")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise SanaCheckpointError(f"{reader.path}: corrupt '{W8A8_METADATA_KEY}' metadata: {shorten(str(e))}") from e
    if version != W8A8_FORMAT_VERSION:
        raise SanaCheckpointError(
            f"{reader.path}: W8A8 format version {shorten(repr(version))} is not supported (this library reads {W8A8_FORMAT_VERSION})"
        )
    modes = {"w8a8": True, "weight_only": False}
    unknown = [f"{name}: {mode!r}" for name, mode in layers.items() if not isinstance(mode, str) or mode not in modes]
    if unknown:
        raise SanaCheckpointError(f"{reader.path}: unknown W8A8 layer modes {preview(unknown)}")
    return {name: modes[mode] for name, mode in layers.items()}


def load_w8a8_dit(
    reader: CheckpointReader,
    cfg: SanaDiTConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> SanaDiT:
    """Build the W8A8 DiT of config `cfg` that a `save_w8a8` file describes and fill it, in eval mode.

    `dtype` applies to the float tensors (biases, kept layers, norms, tables); int8 weights and
    fp32 scales keep their stored dtypes. `dtype=None` keeps the dtype most float tensors are stored in. Keys and shapes are checked before any data is read.
    """
    plan = _plan_from_metadata(reader)
    with torch.device("meta"):
        model = SanaDiT(cfg)
    missing = sorted(name for name in plan if not _is_linear(model, name))
    if missing:
        raise SanaCheckpointError(f"{reader.path}: W8A8 layers {preview(missing)} are not linear layers of a {cfg.variant} DiT")
    apply_plan(
        model, plan,
        lambda linear, act: W8A8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                       quantize_activations=act, device="meta"),
    )
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_keys(reader.path, expected, {key: reader.shape(key) for key in reader.keys()})
    wrong_dtype = [
        f"{name}: {reader.infos[name].dtype}" for name, t in model.state_dict().items()
        if not _stored_dtype_fits(name, t.dtype, reader.infos[name].dtype)
    ]
    if wrong_dtype:
        raise SanaCheckpointError(f"{reader.path}: tensors of the wrong dtype for a W8A8 checkpoint: {preview(wrong_dtype)}")
    # The float tensors (all but the fp32 scales) share one dtype, so a stray one cannot break forward.
    dtype = dtype or dominant_float_dtype(reader, [name for name in expected if not name.endswith(_SCALE_SUFFIX)])

    def tensors():
        for name in expected:
            tensor = reader.read(name)
            if dtype is not None and tensor.is_floating_point() and not name.endswith(_SCALE_SUFFIX):
                tensor = tensor.to(dtype)
            yield name, tensor

    assign_state(model, tensors(), dtype=None, device=device, source=reader.path)
    return model.eval()


def _stored_dtype_fits(name: str, wanted: torch.dtype, stored: torch.dtype) -> bool:
    if wanted == torch.int8:
        return stored == torch.int8
    if name.endswith(_SCALE_SUFFIX):
        return stored == torch.float32
    return stored.is_floating_point


def _is_linear(model: SanaDiT, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), torch.nn.Linear)
    except AttributeError:
        return False
