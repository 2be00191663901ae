"""Format-agnostic checkpoint reading and writing, shared by every model in `sana/`.

Readers expose names, shapes and dtypes *before* any tensor data is read, so a loader can
validate a whole checkpoint (keys, shapes, truncation) and raise before it allocates a
model. Tensor data is then streamed one tensor at a time:

- safetensors are parsed here (the format is an 8-byte header length, a JSON header and
  raw bytes) and each tensor is read with one `readinto` into its own fresh buffer, so
  peak memory stays at one copy of the weights;
- `.pth`/`.pt`/`.bin`/`.ckpt` go through `torch.load(mmap=True, weights_only=True)`, with
  exactly the NumPy globals that rebuild the NumPy RNG state NVlabs' training checkpoints
  hold allowed besides (`NUMPY_RNG_GLOBALS`); a file needing any other global is refused,
  so nothing in a file runs. The weights are the `state_dict` entry when there is one (or
  the entry a caller names, e.g. `state_dict_ema`), else the file's top-level tensors;
- a `*.safetensors.index.json` names the shards beside it (NVlabs' `find_model` reads these);
- a folder is either a diffusers model folder (`config.json` + one or more safetensors,
  sharded with an `*.index.json`; diffusers' own file names win over variants beside them)
  or a pipeline root whose sub-folder holds one.
A file that cannot be used raises `SanaCheckpointError` naming it, with bounded key lists.

`KeySpec` is how both models tie their own parameters to a file layout's keys (one parameter
may be several keys concatenated along dim 0, and shapes may differ by 1×1 dims):
`layout_shapes`, `read_spec` and `layout_state` serve every model from those tables.

Writers (`write_safetensors`, `write_torch`, `write_json`, `write_bytes`,
`write_diffusers_folder`) are atomic: a temp file beside the target, synced, then renamed
over it with the mode a user expects (0666 less the umask, or the replaced file's mode).
A killed writer's temp files are removed by a later save once stale, and nothing else is.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import pickle
import re
import shutil
import stat
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import SanaCheckpointError, SanaNonFiniteError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SHARD_INDEX_SUFFIX = ".safetensors.index.json"
# The entries of NVlabs' training checkpoints (`save_checkpoint_ddp`) that hold weights; their
# inference loads `state_dict`.
WEIGHTS_ENTRY = "state_dict"
EMA_WEIGHTS_ENTRY = "state_dict_ema"
# A header larger than this is not a safetensors header but garbage.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# The weights file names diffusers writes and reads first; a folder may hold others beside them
# (`diffusion_pytorch_model.fp16.safetensors` variants, backups) that a plain load ignores.
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_PREFERRED_WEIGHTS = (DIFFUSERS_WEIGHTS_NAME, "model.safetensors")
# Lists in error messages show this many items and a count, so a hostile file cannot make a huge message.
PREVIEW_ITEMS = 10
# The safetensors metadata key (and `.pth` entry) under which a saved SANA DiT carries its config
# (`SanaDiTConfig.to_dict()` as JSON). Written and read by `sana.dit_io` and by the W8A8 format
# (`sana.quant.checkpoint`), which sits below it.
CONFIG_METADATA_KEY = "sana_dit_config"


def preview(items: Iterable, limit: int = PREVIEW_ITEMS) -> str:
    """`items` as a list for a message: the first `limit` of them, then how many were left out."""
    items = list(items)
    shown = repr([shorten(item) if isinstance(item, str) else item for item in items[:limit]])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def shorten(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters for a message (a hostile file can hold megabytes of it)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _SafetensorsFile:
    """Lazy reader of one safetensors file; validates the header and the file size up front."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise SanaCheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                    raise SanaCheckpointError(
                        f"{path}: corrupt or truncated safetensors header "
                        f"(header length {header_len}, file size {size})"
                    )
                header_bytes = f.read(header_len)
        except OSError as e:
            raise SanaCheckpointError(f"{path}: cannot read: {e}") from e
        try:
            header = json.loads(header_bytes)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd numbers, deep nesting
            raise SanaCheckpointError(f"{path}: corrupt safetensors header: {shorten(str(e))}") from e
        if not isinstance(header, dict):
            raise SanaCheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise SanaCheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings)")
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
        data_size = size - self.data_start
        for name, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise SanaCheckpointError(f"{path}: corrupt header entry for key {shorten(name)!r}: {shorten(repr(entry))}") from e
            if min(shape, default=0) < 0 or not 0 <= begin <= end:
                raise SanaCheckpointError(f"{path}: corrupt header entry for key {shorten(name)!r}: {shorten(repr(entry))}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end - begin != math.prod(shape) * itemsize:
                raise SanaCheckpointError(
                    f"{path}: key {name!r} declares shape {list(shape)} {entry['dtype']} "
                    f"but spans {end - begin} bytes"
                )
            if end > data_size:
                raise SanaCheckpointError(
                    f"{path}: truncated: key {name!r} ends at byte {self.data_start + end} "
                    f"but the file has {size} bytes"
                )
            self.entries[name] = (TensorInfo(shape, dtype), begin, end)

    def read(self, name: str) -> torch.Tensor:
        info, _, _ = self.entries[name]
        # An uninitialised buffer filled by one read: no zero-fill, no intermediate copy.
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read `name` straight into `out` (contiguous CPU, same dtype and element count)."""
        _, begin, end = self.entries[name]
        if end == begin:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        except OSError as e:
            raise SanaCheckpointError(f"{self.path}: cannot read key {name!r}: {e}") from e
        if got != end - begin:
            raise SanaCheckpointError(f"{self.path}: truncated while reading key {name!r}")


@dataclass
class CheckpointReader:
    """Names, shapes and dtypes of a checkpoint's tensors, and a way to read each one.

    `config` holds a diffusers `config.json` when the checkpoint came with one, and
    `metadata` the safetensors `__metadata__` (or the non-tensor entries of a `.pth`).
    """

    path: Path
    container: str  # "safetensors", "torch" or "folder"
    infos: dict[str, TensorInfo]
    _read: Callable[[str], torch.Tensor]
    config: dict | None = None
    metadata: dict = field(default_factory=dict)
    _read_into: Callable[[str, torch.Tensor], None] | None = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def read(self, key: str) -> torch.Tensor:
        """A CPU tensor holding `key`: a fresh buffer, or for `.pth` files the memory-mapped tensor."""
        return self._read(key)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill `out` (contiguous, CPU, `key`'s dtype and element count) with `key`, without a temporary."""
        info = self.infos[key]
        if out.dtype != info.dtype or out.numel() != math.prod(info.shape) or not out.is_contiguous():
            raise ValueError(f"read_into({key!r}): out is {out.dtype} {list(out.shape)}, the file holds {info.dtype} {list(info.shape)}")
        if self._read_into is not None:
            self._read_into(key, out)
        else:
            out.copy_(self._read(key).reshape(out.shape))

    def renamed(self, rename: Callable[[str], str]) -> CheckpointReader:
        """The same checkpoint seen under new key names (e.g. with a prefix stripped)."""
        mapping = {rename(k): k for k in self.infos}
        if len(mapping) != len(self.infos):
            raise SanaCheckpointError(f"{self.path}: key renaming is not one-to-one")
        read, read_into = self._read, self._read_into
        return CheckpointReader(
            self.path,
            self.container,
            {new: self.infos[old] for new, old in mapping.items()},
            lambda k: read(mapping[k]),
            self.config,
            self.metadata,
            None if read_into is None else (lambda k, out: read_into(mapping[k], out)),
        )


@dataclass(frozen=True)
class KeySpec:
    """A model's parameter `name` of `shape` is the dim-0 concatenation of `parts`, each a
    (file key, file shape) of one layout; a single part may differ from `shape` by 1×1 dims."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[tuple[str, tuple[int, ...]], ...]


def layout_shapes(specs: Iterable[KeySpec]) -> dict[str, tuple[int, ...]]:
    """Every key a file of these specs holds, with its shape."""
    return {key: shape for spec in specs for key, shape in spec.parts}


def read_spec(reader: CheckpointReader, spec: KeySpec) -> torch.Tensor:
    """The parameter `spec` describes, read from `reader` (whose keys are checked already)."""
    if len(spec.parts) == 1:
        return reader.read(spec.parts[0][0]).reshape(spec.shape)
    # Fused parts (Q|K|V, K|V): each is read straight into its rows, with no concatenation temporary.
    dtypes = {reader.infos[key].dtype for key, _ in spec.parts}
    if len(dtypes) != 1:
        raise SanaCheckpointError(
            f"{reader.path}: {[key for key, _ in spec.parts]} are stored in different dtypes {sorted(map(str, dtypes))}"
        )
    out = torch.empty(spec.shape, dtype=dtypes.pop())
    start = 0
    for key, shape in spec.parts:
        reader.read_into(key, out[start : start + shape[0]])
        start += shape[0]
    return out


def layout_state(state: Mapping[str, torch.Tensor], specs: Iterable[KeySpec]) -> dict[str, torch.Tensor]:
    """A model's `state` under a layout's key names and shapes (views where possible)."""
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        tensor = state[spec.name]
        if len(spec.parts) == 1:  # also 0-d buffers, which cannot be split
            key, shape = spec.parts[0]
            out[key] = tensor.reshape(shape)
            continue
        sizes = [shape[0] for _, shape in spec.parts]
        for (key, shape), chunk in zip(spec.parts, torch.split(tensor, sizes, dim=0)):
            out[key] = chunk.reshape(shape)
    return out


def _open_safetensors(files: list[Path], path: Path, container: str, config: dict | None) -> CheckpointReader:
    owner: dict[str, _SafetensorsFile] = {}
    metadata: dict = {}
    for file in files:
        st = _SafetensorsFile(file)
        metadata.update(st.metadata)
        for name in st.entries:
            if name in owner:
                raise SanaCheckpointError(f"{path}: key {name!r} appears in both {owner[name].path} and {file}")
            owner[name] = st
    infos = {name: st.entries[name][0] for name, st in owner.items()}
    return CheckpointReader(
        path, container, infos, lambda k: owner[k].read(k), config, metadata, lambda k, out: owner[k].read_into(k, out)
    )


def _numpy_rng_globals() -> list:
    """The globals that rebuild `np.random.get_state()`'s uint32 array, under the module path
    of the NumPy that wrote the file (`numpy.core` before 2.0, `numpy._core` since)."""
    try:
        from numpy._core.multiarray import _reconstruct as reconstruct
    except ImportError:  # NumPy before 1.26
        from numpy.core.multiarray import _reconstruct as reconstruct
    return [
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType: the array's dtype is rebuilt through it
    ]


# NVlabs' training checkpoints (`save_checkpoint_ddp`) keep `np.random.get_state()` in
# `rng_state`: a tuple holding one uint32 array. These globals rebuild that array and nothing
# else; every other global stays refused by PyTorch's weights-only unpickler.
NUMPY_RNG_GLOBALS = _numpy_rng_globals()
# PyTorch reads a (global, "module.name") pair from 2.6 on, the way a file written by another
# NumPy names `_reconstruct`; older versions read the NumPy-less files only.
_ALLOWLIST_READY = hasattr(torch.serialization, "safe_globals") and torch.torch_version.TorchVersion(torch.__version__) >= (2, 6)


def _allowed_global_names() -> set[str]:
    return {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in NUMPY_RNG_GLOBALS}


def _torch_load(path: Path) -> object:
    allowlist = torch.serialization.safe_globals(NUMPY_RNG_GLOBALS) if _ALLOWLIST_READY else contextlib.nullcontext()
    with allowlist:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip file


def _refused_globals(path: Path) -> list[str]:
    """The globals `path`'s pickle names beyond what a weights-only load allows (read, never run)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # damaged, or a PyTorch without this scanner: the error says what torch said
        return []
    return sorted(set(found) - _allowed_global_names())


def _open_torch(path: Path, entry: str | None) -> CheckpointReader:
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        refused = _refused_globals(path)
        if refused:
            raise SanaCheckpointError(
                f"{path}: refused: reading it would call {preview(refused)}, which no weights file needs "
                "(only tensors, plain containers and NumPy's RNG state are read, so nothing in a file runs); "
                "re-save the weights as .safetensors or as a plain dict of tensors"
            ) from None
        raise SanaCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (corrupt or truncated?): {e}") from e
    except Exception as e:  # torch raises many types for damaged files
        raise SanaCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (corrupt or truncated?): {e}") from e
    if not isinstance(obj, dict):
        raise SanaCheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    weights, extra = _weights_entry(path, obj, entry)
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SanaCheckpointError(f"{path}: holds no tensors (keys: {preview(sorted(map(str, weights)))})")
    infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    # Handed over as loaded: memory-mapped (copy-on-write) tensors, so the model becomes the
    # only copy. A clone here would double the peak.
    return CheckpointReader(path, "torch", infos, lambda k: tensors[k], None, extra)


def _weights_entry(path: Path, obj: dict, entry: str | None) -> tuple[dict, dict]:
    """(the dict holding the weights, the file's other plain entries as metadata).

    `entry` names the dict to take; by default `state_dict` when there is one (as NVlabs'
    inference does), a `model` entry of a file with no top-level tensors, else the file itself."""
    if entry is None and isinstance(obj.get(WEIGHTS_ENTRY), dict):
        entry = WEIGHTS_ENTRY
    if entry is None:
        model = obj.get("model")
        if isinstance(model, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            return model, {}
        return obj, {}
    if not isinstance(obj.get(entry), dict):
        entries = sorted(str(k) for k, v in obj.items() if isinstance(v, dict))
        raise SanaCheckpointError(f"{path}: has no '{entry}' entry of weights (the entries holding tensors: {preview(entries)})")
    # Optimizer and scheduler state, RNG state and the other weights are dicts: left out.
    extra = {k: v for k, v in obj.items() if k != entry and not isinstance(v, (dict, torch.Tensor))}
    return obj[entry], extra


def read_json_file(path: Path, what: str = "JSON file") -> object:
    """The parsed content of a small JSON file; any way it can fail is a `SanaCheckpointError` naming it."""
    try:
        return json.loads(path.read_bytes())
    except OSError as e:  # missing, unreadable, a folder
        raise SanaCheckpointError(f"{path}: cannot read the {what}: {e}") from e
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, a number of 5000 digits, deep nesting
        raise SanaCheckpointError(f"{path}: not a valid {what} (corrupt JSON: {shorten(str(e))})") from e


def _open_folder(path: Path, subfolders: Iterable[str]) -> CheckpointReader:
    for sub in subfolders:
        if (path / sub / "config.json").is_file():
            path = path / sub
            break
    config = _folder_config(path)
    index = _weights_index(path)
    if index is not None:
        return _open_sharded(path, index, config)
    preferred = [path / name for name in _PREFERRED_WEIGHTS if (path / name).is_file()]
    files = preferred[:1] or sorted(f for f in path.glob("*.safetensors") if f.is_file())
    if not files:
        raise SanaCheckpointError(f"{path}: folder holds no *.safetensors weights (nor a shard index)")
    if len(files) > 1:
        raise SanaCheckpointError(
            f"{path}: several safetensors files ({preview(f.name for f in files)}) and no *.safetensors.index.json"
        )
    return _open_safetensors(files, path, "folder", config)


def _folder_config(folder: Path) -> dict | None:
    """The `config.json` of a model folder, if it has one."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    config = read_json_file(config_path, "model config")
    if not isinstance(config, dict):
        raise SanaCheckpointError(f"{config_path}: not a model config (a JSON {type(config).__name__}, not an object)")
    return config


def _weights_index(folder: Path) -> Path | None:
    """The shard index a load of `folder` uses: diffusers' (or transformers') own name first."""
    for name in _PREFERRED_WEIGHTS:
        if (folder / f"{name}.index.json").is_file():
            return folder / f"{name}.index.json"
    indexes = sorted(f for f in folder.glob("*.safetensors.index.json") if f.is_file())
    return indexes[0] if indexes else None


def read_shard_index(index: Path) -> dict[str, str]:
    """The `weight_map` (key -> shard file name) of a safetensors shard index, validated."""
    data = read_json_file(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SanaCheckpointError(f"{index}: not a valid shard index (no 'weight_map' of key -> file name)")
    # A shard is a file beside the index: a name with a path in it would read outside the folder.
    odd = sorted({v for v in weight_map.values() if Path(v).name != v or v in ("", ".", "..")})
    if odd:
        raise SanaCheckpointError(f"{index}: shard names must be plain file names, found {preview(odd)}")
    return weight_map


def _open_sharded(path: Path, index: Path, config: dict | None) -> CheckpointReader:
    weight_map = read_shard_index(index)
    files = [path / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SanaCheckpointError(f"{index}: shard files are missing: {preview(missing)}")
    reader = _open_safetensors(files, path, "folder", config)
    absent = sorted(set(weight_map) - set(reader.infos))
    if absent:
        raise SanaCheckpointError(f"{index}: keys listed in the index are in no shard: {preview(absent)}")
    return reader


def open_checkpoint(path: str | os.PathLike, *, subfolders: Iterable[str] = (), entry: str | None = None) -> CheckpointReader:
    """Open a checkpoint file, shard index or folder for lazy reading.

    `subfolders` are tried when `path` is a pipeline root (e.g. `("transformer",)`). `entry`
    names the dict of a PyTorch checkpoint that holds the weights (e.g. `EMA_WEIGHTS_ENTRY`);
    by default `state_dict`, else the top level. Other containers hold one set of weights only.
    """
    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as e:  # e.g. a parent folder we may not enter
        raise SanaCheckpointError(f"{path}: cannot be opened: {e}") from e
    if not exists:
        raise SanaCheckpointError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if entry is not None and (is_dir or suffix not in TORCH_SUFFIXES):
        raise SanaCheckpointError(
            f"{path}: holds one set of weights; an entry such as '{entry}' is part of a PyTorch "
            f"training checkpoint ({', '.join(TORCH_SUFFIXES)})"
        )
    if is_dir:
        return _open_folder(path, subfolders)
    if path.name.lower().endswith(SHARD_INDEX_SUFFIX):
        return _open_sharded(path.parent, path, _folder_config(path.parent))
    if suffix == ".safetensors":
        return _open_safetensors([path], path, "safetensors", None)
    if suffix in TORCH_SUFFIXES:
        return _open_torch(path, entry)
    # Unknown extension: sniff the content rather than trusting the name.
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise SanaCheckpointError(f"{path}: cannot read: {e}") from e
    if head[:2] == b"PK":
        return _open_torch(path, None)
    if len(head) == 8 and struct.unpack("<Q", head)[0] < _MAX_HEADER_BYTES:
        try:
            return _open_safetensors([path], path, "safetensors", None)
        except SanaCheckpointError:
            pass
    raise SanaCheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, .pth/.pt/.bin/.ckpt, a "
        f"*{SHARD_INDEX_SUFFIX} or a diffusers folder)"
    )


def strip_prefix(reader: CheckpointReader, prefixes: Iterable[str]) -> CheckpointReader:
    """Drop the first prefix that every tensor key shares (e.g. ComfyUI's `model.diffusion_model.`)."""
    keys = reader.keys()
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return reader.renamed(lambda k, p=prefix: k[len(p):])
    return reader


def check_keys(
    path: Path | str,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    *,
    ignored: Callable[[str], bool] = lambda k: False,
) -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not ignored(k))
    mismatched = [
        f"{k}: expected {list(expected[k])}, found {list(found[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {preview(unexpected)}")
    if mismatched:
        problems.append(f"wrong shapes ({len(mismatched)}): {preview(mismatched)}")
    if problems:
        raise SanaCheckpointError(f"{path}: " + "; ".join(problems))


def dominant_float_dtype(reader: CheckpointReader, keys: Iterable[str] | None = None) -> torch.dtype | None:
    """The floating-point dtype that holds most of the elements of `keys` (default: every tensor).

    A loader that keeps "the stored dtype" uses this for the whole model, so one tensor stored
    in another dtype is cast rather than leaving a model of mixed dtypes that fails in forward.
    """
    elements: dict[torch.dtype, int] = {}
    for key in reader.keys() if keys is None else keys:
        info = reader.infos[key]
        if info.dtype.is_floating_point:
            elements[info.dtype] = elements.get(info.dtype, 0) + math.prod(info.shape)
    if not elements:
        return None
    return max(elements, key=lambda d: (elements[d], torch.finfo(d).bits))  # a tie goes to the wider dtype


# A config value that is a string or list longer than these is garbage, not a model description.
_MAX_CONFIG_STRING = 1000
_MAX_CONFIG_ITEMS = 1024
_MAX_CONFIG_ENTRIES = 512


def check_config_values(source: str, data: Mapping, bounds: Mapping[str, tuple[float, float]], *, optional: Iterable[str] = ()) -> None:
    """Refuse a config with values no real model has, before anything is built from it.

    `bounds[key] = (lo, hi)`: the value (or every number of a list value) lies in [lo, hi] and is
    an integer when `lo` is an int; keys in `optional` may also be null. Every string and list in
    `data` must be short. The message names `source` and the first few values at fault.
    """
    if len(data) > _MAX_CONFIG_ENTRIES:
        raise SanaCheckpointError(f"{source}: not a model config ({len(data)} entries)")
    allowed_null = set(optional)
    problems = [f"{key}: {problem}" for key, value in data.items() if (problem := _oversized(value))]
    for key, (lo, hi) in bounds.items():
        if key not in data or (data[key] is None and key in allowed_null):
            continue
        numbers = _flatten(data[key])
        wanted = "an integer" if isinstance(lo, int) else "a number"
        bad = [
            n for n in numbers
            if isinstance(n, bool) or not isinstance(n, (int, float)) or (isinstance(lo, int) and not isinstance(n, int))
            or not lo <= n <= hi  # also refuses NaN
        ]
        if bad:
            problems.append(f"{key}={shorten(repr(data[key]), 60)} (expected {wanted} in [{lo}, {hi}])")
    if problems:
        raise SanaCheckpointError(f"{source}: values out of range for a model config: {preview(problems)}")


def _oversized(value: object) -> str | None:
    if isinstance(value, str) and len(value) > _MAX_CONFIG_STRING:
        return f"a string of {len(value)} characters"
    if isinstance(value, (list, tuple, dict)):
        if len(value) > _MAX_CONFIG_ITEMS:
            return f"{len(value)} entries"
        for item in value.values() if isinstance(value, dict) else value:
            if problem := _oversized(item):
                return problem
    return None


def _flatten(value: object) -> list:
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in _flatten(item)]
    return [value]


def metadata_json(metadata: Mapping, key: str, source: str) -> dict | None:
    """The JSON object a saver stored under `metadata[key]` (safetensors `__metadata__`, or a
    `.pth` entry), None when there is none; `source` names it in messages. Its values are for
    the caller to check."""
    stored = metadata.get(key)
    if stored is None:
        return None
    if not isinstance(stored, str):
        raise SanaCheckpointError(f"{source} is not a JSON string")
    try:
        data = json.loads(stored)
    except (ValueError, RecursionError) as e:
        raise SanaCheckpointError(f"{source} is corrupt: {shorten(str(e))}") from None
    if not isinstance(data, dict):
        raise SanaCheckpointError(f"{source} is corrupt: a JSON {type(data).__name__}, not an object")
    return data


def stored_config(reader: CheckpointReader, key: str) -> tuple[dict, str] | None:
    """(the config a saver stored under metadata `key`, the source to name in messages), or None."""
    source = f"{reader.path}: '{key}' metadata"
    data = metadata_json(reader.metadata, key, source)
    return None if data is None else (data, source)


def warn_on_config_conflict(path: Path, key: str, stored: Mapping, from_json: Mapping, stacklevel: int) -> None:
    """Warn when the config stored in the weights (metadata `key`) and `path`'s `config.json`,
    both as `config.json` mappings, describe different models; the stored one is used."""
    differ = [f"{name}: {stored[name]!r} vs {from_json.get(name)!r}" for name in stored if stored[name] != from_json.get(name)]
    if differ:
        warnings.warn(
            f"{path}: the config stored in the weights ('{key}' metadata) and {path / 'config.json'} disagree "
            f"({preview(differ)}); using the one stored in the weights, which was written with them "
            "(pass config= to choose)",
            stacklevel=stacklevel + 1,
        )


def assign_state(
    module: torch.nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str,
    source: str | os.PathLike,
) -> torch.nn.Module:
    """Fill a module built on the meta device with tensors streamed one by one from the file
    `source`.

    Floating-point tensors are cast to `dtype` (when given) as they arrive, so memory never
    holds the checkpoint and the model at once. Every parameter and buffer must be covered.
    A read that fails on the way (truncated or corrupt tensor data) is a `SanaCheckpointError`
    naming `source`.
    """
    state: dict[str, torch.Tensor] = {}
    try:
        for name, tensor in tensors:
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[name] = tensor.to(device)
        module.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, OSError) as e:
        raise SanaCheckpointError(f"{source}: failed while reading tensor data: {e}") from e
    release_freed_memory()
    left_on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise SanaCheckpointError(f"internal error: tensors left uninitialised: {left_on_meta}")
    return module


def release_freed_memory() -> None:
    """Hand memory freed during a load back to the OS. glibc keeps freed blocks of the sizes a
    checkpoint's tensors have in its heap, which shows up as resident memory never used again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically: a failed write never clobbers an existing file."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    ordered = []
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_TO_SAFETENSORS:
            raise SanaCheckpointError(f"{path}: cannot store key {name!r} of dtype {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_TO_SAFETENSORS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        ordered.append(t)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned
    _atomic_write(path, lambda f: _write_st_body(f, header_bytes, ordered))


def _write_st_body(f, header_bytes: bytes, tensors: list[torch.Tensor]) -> None:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for t in tensors:
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


# Temp files and staging folders are named after their target and their writer's pid, so a
# later save can tell its own leftovers (from a killed save) from anything else in the folder.
# Ours is stale when its writer is not running here and it has not been written to for
# _STALE_SECONDS (the pause guards a writer on another machine sharing the folder), or when
# nothing has touched it for a day (a pid reused since).
_STALE_SECONDS = 10 * 60
_ABANDONED_SECONDS = 24 * 60 * 60
_TEMP_CHARS = r"[a-z0-9_]{8}"  # tempfile's random part


def _atomic_write(path: Path, write: Callable) -> None:
    """Write `path` through a temp file beside it, renamed over it once complete and on disk.

    The file gets the mode a plain `open()` would give it (0666 less the umask), or the mode of
    the file it replaces. A failure leaves the old file as it was and raises `SanaCheckpointError`.
    """
    if path.is_dir():
        raise SanaCheckpointError(f"{path}: is a folder; give a file name to write to")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path.parent, _temp_pattern(path.name))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:
        raise SanaCheckpointError(f"{path}: cannot write: {e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        _install(Path(tmp), path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SanaCheckpointError(f"{path}: cannot write: {e}") from e
        raise


def _temp_pattern(name: str) -> re.Pattern:
    # The second form is the pid-less name of earlier versions; only its age can tell it stale.
    return re.compile(rf"\.{re.escape(name)}\.(?:(?P<pid>\d+)\.)?{_TEMP_CHARS}\.tmp")


def _install(new: Path, target: Path) -> None:
    """Rename `new` over `target` with the mode `target` has (or a new file's mode), then sync the folder."""
    os.chmod(new, _replaced_mode(target))
    os.replace(new, target)
    _fsync_folder(target.parent)


def _replaced_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(folder: Path, pattern: re.Pattern) -> None:
    """Delete this writer's own leftovers in `folder` (names matching `pattern`) that are stale."""
    try:
        entries = [e for e in folder.iterdir() if pattern.fullmatch(e.name)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        pid = match.group("pid")
        try:
            idle = now - _last_written(entry)
        except OSError:
            continue
        dead = pid is not None and not _running(int(pid))
        if idle >= _ABANDONED_SECONDS or (dead and idle >= _STALE_SECONDS):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _last_written(entry: Path) -> float:
    times = [entry.lstat().st_mtime]
    if entry.is_dir() and not entry.is_symlink():  # a staging folder: its files grow, not the folder
        times += [child.lstat().st_mtime for child in entry.iterdir()]
    return max(times)


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive but another user's
        return True
    return True


@contextlib.contextmanager
def _staging_folder(folder: Path) -> Iterator[Path]:
    """A hidden folder inside `folder` to write a set of files into before they replace the old ones."""
    pattern = re.compile(rf"\.saving-(?:(?P<pid>\d+)-)?{_TEMP_CHARS}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder, pattern)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".saving-{os.getpid()}-"))
    except OSError as e:
        raise SanaCheckpointError(f"{folder}: cannot write: {e}") from e
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pipeline_subfolder(path: str | os.PathLike, subfolder: str) -> Path:
    """Where a model saved to `path` goes: `path/subfolder` when `path` is a diffusers pipeline
    root (it holds `model_index.json` or that sub-folder), which is where the loaders read it."""
    path = Path(path)
    if (path / "model_index.json").is_file() or (path / subfolder).is_dir():
        return path / subfolder
    return path


def _shard_name(index: int, count: int) -> str:
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


_SHARD_NAME = re.compile(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors")


def write_diffusers_folder(
    folder: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping,
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int,
) -> None:
    """Write a diffusers model folder: `config.json` (`config`, whose `_class_name` says the model)
    and `diffusion_pytorch_model.safetensors`, or shards of at most `max_shard_bytes` listed in
    `diffusion_pytorch_model.safetensors.index.json`.

    A previous save of the same model class is replaced: its single file, its index and the
    shards that index lists under this writer's shard names. Nothing else in the folder is
    touched (fp16 variants, backups, a user's files); a `config.json` of another class is refused.
    """
    folder = Path(folder)
    _refuse_foreign_config(folder / "config.json", str(config.get("_class_name")))
    shards = _split_shards(tensors, max_shard_bytes)
    names = [DIFFUSERS_WEIGHTS_NAME] if len(shards) == 1 else [_shard_name(i + 1, len(shards)) for i in range(len(shards))]
    index_name = f"{DIFFUSERS_WEIGHTS_NAME}.index.json"
    previous = _previous_save(folder, index_name)
    with _staging_folder(folder) as staging:
        for name, shard in zip(names, shards):
            write_safetensors(staging / name, shard, metadata)
        written = list(names)
        if len(shards) > 1:
            weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json(staging / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})
            written.append(index_name)  # after its shards: a reader never sees an index without them
        write_json(staging / "config.json", dict(config))
        written.append("config.json")
        try:
            for name in written:
                _install(staging / name, folder / name)
            # An index left from a sharded save would still be read first: it goes before the old shards.
            for name in sorted(previous - set(written), key=lambda n: n != index_name):
                (folder / name).unlink(missing_ok=True)
        except OSError as e:
            raise SanaCheckpointError(f"{folder}: cannot write: {e}") from e


def _split_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _previous_save(folder: Path, index_name: str) -> set[str]:
    """The files of an earlier save in `folder` under this writer's names."""
    found = {name for name in (DIFFUSERS_WEIGHTS_NAME, index_name) if (folder / name).is_file()}
    if index_name in found:
        try:
            listed = read_shard_index(folder / index_name).values()
        except SanaCheckpointError:
            listed = ()  # a damaged index is replaced, but names nothing to remove
        found |= {name for name in listed if _SHARD_NAME.fullmatch(name)}
    return found


def _refuse_foreign_config(path: Path, class_name: str) -> None:
    if not path.exists():
        return
    try:
        existing = read_json_file(path, "model config")
    except SanaCheckpointError:
        existing = None
    found = existing.get("_class_name") if isinstance(existing, dict) else None
    if found != class_name:
        what = f"a config for {shorten(str(found))}" if isinstance(existing, dict) else "no readable model config"
        raise SanaCheckpointError(
            f"{path}: holds {what}, not a {class_name} one; refusing to overwrite it "
            "(save into an empty folder or one that holds this kind of model)"
        )


def write_torch(path: str | os.PathLike, obj: object) -> None:
    """`torch.save` with the same all-or-nothing guarantee as `write_safetensors`."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def check_finite_weights(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """`SanaNonFiniteError` naming `what`'s first weight that holds NaN/inf: a save calls this
    before writing anything, so no checkpoint ever carries non-finite weights."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SanaNonFiniteError(f"{what}'s weight {name} holds NaN/inf values; not saving it")


def write_layout(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    official: bool,
    diffusers_config: Mapping[str, object],
    subfolder: str,
    max_shard_bytes: int,
) -> None:
    """Write a SANA transformer's weights (the DiT's or a ControlNet's), already under their
    layout's names, as `path` asks: a `.safetensors` path is one file with `metadata`; otherwise
    an official model is a `.pth` holding `{"state_dict": ..., CONFIG_METADATA_KEY: ...}` and a
    diffusers one a folder (`write_diffusers_folder`, in `subfolder` of a pipeline root)."""
    if path.suffix.lower() == ".safetensors":
        write_safetensors(path, tensors, metadata)
    elif official:
        state = {k: v.contiguous() for k, v in tensors.items()}
        write_torch(path, {"state_dict": state, CONFIG_METADATA_KEY: metadata[CONFIG_METADATA_KEY]})
    else:
        write_diffusers_folder(pipeline_subfolder(path, subfolder), tensors, dict(diffusers_config), metadata=metadata,
                               max_shard_bytes=max_shard_bytes)


def write_json(path: str | os.PathLike, obj: object) -> None:
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` with the same all-or-nothing guarantee as `write_safetensors`."""
    _atomic_write(Path(path), lambda f: f.write(data))


def load_torch_data(path: str | os.PathLike, *, numpy_rng: bool = False) -> object:
    """A file written by `write_torch`, loaded without running code: tensors and plain data
    (dicts, lists, tuples, numbers, strings, None) only, through `torch.load(weights_only=True)`;
    with `numpy_rng`, also a NumPy RNG state (`NUMPY_RNG_GLOBALS`, as older trainer states hold).
    Anything else (a truncated or corrupt file, an object whose unpickling would run code) is a
    `SanaCheckpointError`."""
    path = Path(path)
    allowlist = torch.serialization.safe_globals(NUMPY_RNG_GLOBALS) if numpy_rng and _ALLOWLIST_READY else contextlib.nullcontext()
    try:
        with allowlist:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or unsafe files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(e).__name__)
        raise SanaCheckpointError(f"{path}: cannot be loaded as tensors and plain data (truncated, corrupt, or an object that would run code): {reason}") from None
