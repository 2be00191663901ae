"""Where an image came from: the generation record every PNG of `python -m sana generate` carries.

A record is plain JSON data: `request` (the keyword arguments of `sana.generate` that made the
image, every default resolved: solver, steps, size, flow shift, PAG layers), `image_index` (the
row of that call's output the PNG holds), `models` (for the DiT, DC-AE and text encoder: the
path loaded, a display name, the dtype and the SHA-256 of the files, see `model_hash`) and the
project `version`. Inputs beyond the models ride beside them: `image` (image to image's input:
path and SHA-256), `controlnet` (path, name, SHA-256, dtype) and `control_image` (path, SHA-256).
It goes into two PNG text chunks (`png_text`):

- `parameters`: the A1111 infotext that stable-diffusion-webui, Forge, Civitai and the ComfyUI
  nodes that read A1111 images parse: the prompt, `Negative prompt: ...` (when there is one),
  then one line of `Key: value` pairs, `Steps, Sampler, CFG scale, Seed, Size (WxH), Model
  hash, Model` first as A1111 writes them, then SANA's own keys (`VAE hash`, `Text encoder
  hash`, `Flow shift`, `PAG scale`, `ControlNet`, `Control scale`, ...) and `Version`. Values holding a comma, a colon or a
  newline are JSON-quoted, A1111's rule. `Model hash` is A1111's short form: the first 10 hex
  digits of the SHA-256 (what A1111 and Civitai call AutoV2 for a single file).
- `sana`: the record itself as JSON, exact: `read_record` reads it back, and
  `python -m sana generate --replay IMAGE.png` calls `generate(**request)` again with it.

`model_hash` hashes what the loader reads: a file's bytes (SHA-256), a folder's non-hidden
files (a pipeline root: only the component's sub-folders, so `root` and `root/transformer` hash
alike) as the SHA-256 of the lines `<relative path>\\0<file SHA-256>\\n` in path order, and a
sharded `*.index.json` with the shards it names. Each file's digest is cached by (absolute path, size, modification time) in
`file_hashes.json` in the cache folder (`SANA_CACHE_DIR`, see `sana.kernels.choice_cache`), so a
rerun does not read gigabytes again; a cache that cannot be read or written only costs the rehash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import read_shard_index, write_json
from .errors import SanaCheckpointError
from .kernels.choice_cache import cache_dir
from .png import read_png_text

RECORD_KEY = "sana"  # the PNG text chunk holding the record as JSON
PARAMETERS_KEY = "parameters"  # the A1111 infotext chunk
RECORD_FORMAT = 1
HASH_CACHE_NAME = "file_hashes.json"
SHORT_HASH = 10  # hex digits of A1111's "Model hash"
PROJECT = "sana-comfy"
# The keyword arguments of `sana.generate` a record may carry (anything else in a file is refused).
REQUEST_KEYS = (
    "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "flow_shift", "solver",
    "pag_scale", "pag_layers", "chi", "resolution_binning", "batch_size", "strength",
    "control_scale", "control_start", "control_end",
)
COMPONENTS = ("dit", "vae", "text_encoder")
# A pipeline root's sub-folders each loader reads (see `sana.checkpoint.pipeline_subfolder`).
COMPONENT_FOLDERS = {
    "dit": ("transformer",), "vae": ("vae",), "text_encoder": ("text_encoder", "tokenizer"), "controlnet": ("controlnet",),
}

_log = logging.getLogger("sana")
_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------
# The project version


def project_version() -> str:
    """`sana-comfy <version>`: from the `pyproject.toml` beside the package in a source
    checkout (the code that actually runs), else from the installed distribution."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return f"{PROJECT} {found.group(1)}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{PROJECT} {version(PROJECT)}"
    except PackageNotFoundError:
        return f"{PROJECT} unknown"


# ---------------------------------------------------------------------------------------
# Model hashes


def model_files(path: str | os.PathLike, component: str) -> tuple[Path, list[Path]]:
    """(base, files): the files the loader of `component` ("dit", "vae", "text_encoder") reads
    at `path`, sorted by their path relative to `base`. A pipeline root's one component folder
    is its own base, so the root and the folder hash alike."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return path.parent, sorted({path, *(path.parent / shard for shard in read_shard_index(path).values())})
        return path.parent, [path]
    if not path.is_dir():
        raise SanaCheckpointError(f"{path}: no such file or folder to hash")
    folders = [path]
    if (path / "model_index.json").is_file() or (path / COMPONENT_FOLDERS[component][0]).is_dir():
        folders = [path / sub for sub in COMPONENT_FOLDERS[component] if (path / sub).is_dir()]
    base = folders[0] if len(folders) == 1 else path
    files = [
        file for folder in folders for file in folder.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(base).parts)
    ]
    return base, sorted(files, key=lambda file: file.relative_to(base).as_posix())


class HashCache:
    """SHA-256 digests of files by (absolute path, size, mtime in ns), kept in a JSON file."""

    def __init__(self, path: Path | None = None):
        self.path = path if path is not None else cache_dir() / HASH_CACHE_NAME
        self.entries = self._read()
        self.changed = False

    def _read(self) -> dict[str, Any]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            _log.warning("sana: ignoring the file-hash cache %s (%s); files are hashed again", self.path, error)
            return {}
        return entries if isinstance(entries, dict) else {}

    def digest(self, file: Path) -> str:
        file = file.resolve()
        info = file.stat()
        key, stamp = str(file), [info.st_size, info.st_mtime_ns]
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = file_sha256(file)
        self.entries[key] = {"stamp": stamp, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            write_json(self.path, self.entries)
            self.changed = False
        except SanaCheckpointError as error:
            _log.warning("sana: cannot save the file-hash cache (%s); the next run hashes again", error)


def file_sha256(file: Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    try:
        with open(file, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
    except OSError as error:
        raise SanaCheckpointError(f"cannot read {file} to hash it: {error}") from None
    return digest.hexdigest()


def model_hash(path: str | os.PathLike, component: str, cache: HashCache | None = None) -> str:
    """The SHA-256 (hex) of the model at `path` as the module docstring defines it: a single
    file's own digest, else the digest of its files' relative paths and digests."""
    path = Path(path)
    cache = cache or HashCache()
    base, files = model_files(path, component)
    if path.is_file() and len(files) == 1:
        return cache.digest(files[0])
    listing = "".join(f"{file.relative_to(base).as_posix()}\0{cache.digest(file)}\n" for file in files)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def display_name(path: str | os.PathLike) -> str:
    """A model's name as A1111 shows it: a file's stem; a folder's name, after its parent's when
    it is a pipeline component (`shapes-tiny/transformer`)."""
    path = Path(os.path.abspath(path))
    if path.is_file():
        return Path(path.name.removesuffix(".index.json")).stem
    subfolders = {name for names in COMPONENT_FOLDERS.values() for name in names}
    return f"{path.parent.name}/{path.name}" if path.name in subfolders else path.name


def describe_models(paths: Mapping[str, str | os.PathLike]) -> dict[str, dict[str, str]]:
    """The record's `models` less the dtypes: for each component in `paths` ("dit", "vae",
    "text_encoder"), its absolute path, display name and `model_hash`."""
    cache = HashCache()
    try:
        return {
            component: {"path": os.path.abspath(path), "name": display_name(path), "sha256": model_hash(path, component, cache)}
            for component, path in paths.items()
        }
    finally:
        cache.save()


# ---------------------------------------------------------------------------------------
# Records


def make_record(request: Mapping[str, Any], models: Mapping[str, Mapping[str, str]], *, image_index: int = 0,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A record (JSON data) for row `image_index` of `generate(**request)` with `models`;
    `extra` adds keys of the caller's (e.g. the input image of image to image)."""
    unknown = sorted(set(request) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"not arguments a record keeps: {unknown}")
    record = {"format": RECORD_FORMAT, "request": dict(request), "image_index": image_index,
              "models": {k: dict(v) for k, v in models.items()}, "version": project_version()}
    record.update(extra or {})
    return json.loads(json.dumps(record))  # plain JSON data: what a reader gets back


def image_prompt(record: Mapping[str, Any]) -> str:
    """The prompt of the record's image (its row's prompt when `generate` had several)."""
    request = record["request"]
    prompts = request["prompt"]
    if isinstance(prompts, str):
        return prompts
    return prompts[record["image_index"] // int(request.get("batch_size", 1))]


def image_seed(record: Mapping[str, Any]) -> int | None:
    seed = record["request"].get("seed")
    return seed[record["image_index"]] if isinstance(seed, list) else seed


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def parameters_text(record: Mapping[str, Any]) -> str:
    """The A1111 infotext of a record (module docstring)."""
    request, models = record["request"], record["models"]
    pairs: list[tuple[str, object]] = [
        ("Steps", request["steps"]),
        ("Sampler", request["solver"]),
        ("CFG scale", _number(request["guidance_scale"])),
        ("Seed", image_seed(record)),
        ("Size", f"{request['width']}x{request['height']}"),
    ]
    labels = {"dit": ("Model hash", "Model"), "vae": ("VAE hash", "VAE"), "text_encoder": ("Text encoder hash", "Text encoder")}
    for component in COMPONENTS:
        if component in models:
            hash_label, name_label = labels[component]
            pairs += [(hash_label, models[component]["sha256"][:SHORT_HASH]), (name_label, models[component]["name"])]
    if request.get("flow_shift") is not None:
        pairs.append(("Flow shift", _number(request["flow_shift"])))
    if request.get("pag_scale"):
        pairs += [("PAG scale", _number(request["pag_scale"])), ("PAG layers", " ".join(map(str, request["pag_layers"])))]
    if request.get("chi") is not True:
        pairs.append(("CHI", "off" if request.get("chi") is False else request["chi"]))
    if request.get("resolution_binning") is False:
        pairs.append(("Resolution binning", "off"))
    if "image" in record:
        pairs.append(("Denoising strength", _number(request["strength"])))
    if "controlnet" in record:
        controlnet = record["controlnet"]
        pairs += [
            ("ControlNet hash", str(controlnet.get("sha256", ""))[:SHORT_HASH]), ("ControlNet", controlnet.get("name")),
            ("Control scale", _number(request.get("control_scale", 1.0))),
            ("Control steps", f"{_number(request.get('control_start', 0.0))}-{_number(request.get('control_end', 1.0))}"),
        ]
    batch = len(request["prompt"]) if isinstance(request["prompt"], list) else 1
    if batch * int(request.get("batch_size", 1)) > 1 and not isinstance(request.get("seed"), list):
        pairs += [("Batch size", batch * int(request["batch_size"])), ("Batch pos", record["image_index"])]
    pairs.append(("Version", record["version"]))
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in pairs)
    uses_negative = request["solver"] != "trigflow"  # TrigFlow (Sprint) has no CFG
    negative = (request.get("negative_prompt") or "") if uses_negative else ""
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{image_prompt(record)}{negative_line}\n{settings}"


def png_text(record: Mapping[str, Any]) -> dict[str, str]:
    """The PNG text chunks of a record: the A1111 `parameters`, then the exact `sana` JSON."""
    return {PARAMETERS_KEY: parameters_text(record), RECORD_KEY: json.dumps(record, ensure_ascii=False, sort_keys=True)}


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The generation record of the PNG at `path`; `SanaCheckpointError` naming the file when it
    is not a complete PNG or carries no usable record."""
    text = read_png_text(path)
    if RECORD_KEY not in text:
        found = f" (it has A1111 parameters, but not SANA's '{RECORD_KEY}' record)" if PARAMETERS_KEY in text else ""
        raise SanaCheckpointError(f"{path}: no generation record{found}; only images written by python -m sana generate carry one")
    try:
        record = json.loads(text[RECORD_KEY])
    except ValueError as error:
        raise SanaCheckpointError(f"{path}: the '{RECORD_KEY}' text chunk is not valid JSON ({error})") from None
    problem = _record_problem(record)
    if problem:
        raise SanaCheckpointError(f"{path}: unusable generation record: {problem}")
    return record


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("format") != RECORD_FORMAT:
        return f"format {record.get('format')!r}; this version reads format {RECORD_FORMAT}"
    request, models = record.get("request"), record.get("models")
    if not isinstance(request, dict) or "prompt" not in request:
        return "no request with a prompt"
    unknown = sorted(set(request) - set(REQUEST_KEYS))
    if unknown:
        return f"unknown request keys {unknown}"
    if not isinstance(models, dict) or not all(
        isinstance(models.get(c), dict) and isinstance(models[c].get("path"), str) for c in COMPONENTS
    ):
        return f"models must name the path of each of {', '.join(COMPONENTS)}"
    index = record.get("image_index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return f"image_index must be a whole number >= 0, got {index!r}"
    return None


def same_generation(record: Mapping[str, Any], request: Mapping[str, Any], hashes: Mapping[str, str]) -> str | None:
    """None when `record` describes row 0 of `request` with models of these `hashes`; else what differs."""
    theirs = record.get("request", {})
    ours = json.loads(json.dumps(dict(request)))
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            return f"{key} {theirs.get(key)!r:.80} instead of {ours.get(key)!r:.80}"
    if record.get("image_index") != 0:
        return f"image_index {record.get('image_index')!r} instead of 0"
    for component, digest in hashes.items():
        made_with = record.get("models", {}).get(component, {}).get("sha256")
        if made_with != digest:
            return f"{component} hash {str(made_with)[:SHORT_HASH]} instead of {digest[:SHORT_HASH]}"
    return None


__all__ = [
    "HashCache",
    "PARAMETERS_KEY",
    "RECORD_KEY",
    "REQUEST_KEYS",
    "describe_models",
    "display_name",
    "file_sha256",
    "image_prompt",
    "make_record",
    "model_files",
    "model_hash",
    "parameters_text",
    "png_text",
    "project_version",
    "read_record",
    "same_generation",
]
