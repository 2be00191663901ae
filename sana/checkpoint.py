"""Format-agnostic checkpoint reading and writing, shared by every model in `sana/`.

Readers expose names, shapes and dtypes *before* any tensor data is read, so a loader can
validate a whole checkpoint (keys, shapes, truncation) and raise before it allocates a
model. Tensor data is then streamed one tensor at a time:

- safetensors are parsed here (the format is an 8-byte header length, a JSON header and
  raw bytes) and each tensor is read with one `readinto` into its own fresh buffer, so
  peak memory stays at one copy of the weights;
- `.pth`/`.pt`/`.bin`/`.ckpt` go through `torch.load(mmap=True, weights_only=True)`;
- a folder is either a diffusers model folder (`config.json` + one or more safetensors,
  sharded with an `*.index.json`) or a pipeline root whose sub-folder holds one.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SanaCheckpointError

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
# A header larger than this is not a safetensors header but garbage.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


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
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SanaCheckpointError(f"{path}: corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise SanaCheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
        data_size = size - self.data_start
        for name, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise SanaCheckpointError(f"{path}: corrupt header entry for key {name!r}: {entry!r}") from e
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
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
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


def _open_torch(path: Path) -> CheckpointReader:
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip file
    except Exception as e:  # torch raises many types for damaged files
        raise SanaCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (corrupt or truncated?): {e}") from e
    if not isinstance(obj, dict):
        raise SanaCheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    extra: dict = {}
    if isinstance(obj.get("state_dict"), dict):
        extra = {k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, (dict, torch.Tensor))}
        obj = obj["state_dict"]
    elif isinstance(obj.get("model"), dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["model"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SanaCheckpointError(f"{path}: holds no tensors (keys: {sorted(obj)[:10]})")
    infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    # Handed over as loaded: memory-mapped (copy-on-write) tensors, so the model becomes the
    # only copy. A clone here would double the peak.
    return CheckpointReader(path, "torch", infos, lambda k: tensors[k], None, extra)


def _open_folder(path: Path, subfolders: Iterable[str]) -> CheckpointReader:
    for sub in subfolders:
        if (path / sub / "config.json").is_file():
            path = path / sub
            break
    config = None
    config_path = path / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SanaCheckpointError(f"{config_path}: cannot be parsed: {e}") from e
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map: dict[str, str] = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise SanaCheckpointError(f"{indexes[0]}: not a valid shard index: {e}") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SanaCheckpointError(f"{indexes[0]}: shard files are missing: {missing}")
        reader = _open_safetensors(files, path, "folder", config)
        absent = sorted(set(weight_map) - set(reader.infos))
        if absent:
            raise SanaCheckpointError(f"{indexes[0]}: keys listed in the index are in no shard: {absent[:20]}")
        return reader
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SanaCheckpointError(f"{path}: folder holds no *.safetensors weights (nor a shard index)")
    if len(files) > 1:
        raise SanaCheckpointError(
            f"{path}: several safetensors files ({[f.name for f in files]}) and no *.safetensors.index.json"
        )
    return _open_safetensors(files, path, "folder", config)


def open_checkpoint(path: str | os.PathLike, *, subfolders: Iterable[str] = ()) -> CheckpointReader:
    """Open a checkpoint file or folder for lazy reading.

    `subfolders` are tried when `path` is a pipeline root (e.g. `("transformer",)`).
    """
    path = Path(path)
    if not path.exists():
        raise SanaCheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path, subfolders)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _open_safetensors([path], path, "safetensors", None)
    if suffix in TORCH_SUFFIXES:
        return _open_torch(path)
    # Unknown extension: sniff the content rather than trusting the name.
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return _open_torch(path)
    if len(head) == 8 and struct.unpack("<Q", head)[0] < _MAX_HEADER_BYTES:
        try:
            return _open_safetensors([path], path, "safetensors", None)
        except SanaCheckpointError:
            pass
    raise SanaCheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, .pth/.pt/.bin/.ckpt or a diffusers folder)"
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
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if mismatched:
        problems.append(f"wrong shapes ({len(mismatched)}): {mismatched}")
    if problems:
        raise SanaCheckpointError(f"{path}: " + "; ".join(problems))


def assign_state(
    module: torch.nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str,
) -> torch.nn.Module:
    """Fill a module built on the meta device with tensors streamed one by one.

    Floating-point tensors are cast to `dtype` (when given) as they arrive, so memory never
    holds the checkpoint and the model at once. Every parameter and buffer must be covered.
    """
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
    module.load_state_dict(state, strict=True, assign=True)
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


def _atomic_write(path: Path, write: Callable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_torch(path: str | os.PathLike, obj: object) -> None:
    """`torch.save` with the same all-or-nothing guarantee as `write_safetensors`."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_json(path: str | os.PathLike, obj: object) -> None:
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` with the same all-or-nothing guarantee as `write_safetensors`."""
    _atomic_write(Path(path), lambda f: f.write(data))


def load_torch_data(path: str | os.PathLike) -> object:
    """A file written by `write_torch`, loaded without running code: tensors and plain data
    (dicts, lists, tuples, numbers, strings, None) only, through `torch.load(weights_only=True)`.
    A caller that trusts a few more types allows exactly those with
    `torch.serialization.safe_globals([...])` around the call. Anything else (a truncated or
    corrupt file, an object whose unpickling would run code) is a `SanaCheckpointError`."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or unsafe files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(e).__name__)
        raise SanaCheckpointError(f"{path}: cannot be loaded as tensors and plain data (truncated, corrupt, or an object that would run code): {reason}") from None
