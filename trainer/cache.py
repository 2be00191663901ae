"""The latent / text-embedding cache: `build_cache` encodes a data source once, `LatentCache` reads it.

`build_cache` runs the DC-AE and the text encoder on `device` in `dtype` (bf16 on an accelerator
by default), in batches of `batch_size`: images are read a batch at a time, so the pixels in
memory are bounded by the batch (the encoded latents and captions by the shard), and each batch
holds images of one bin, chosen from the image headers before any pixel is decoded. Shards of
`shard_size` samples are written atomically as safetensors; training then reads only the shards,
so neither Gemma nor the DC-AE is in memory while the DiT trains.

A cache is never reused silently when what it was built from changed:
- its settings (`CacheSettings`: resolution, caption length, CHI, flips, bucket merging,
  encoding dtype, and content hashes of the DC-AE's and the text encoder's files) are stored in
  `cache.json` and in every shard; a build with other settings is refused, naming each change;
- each sample records its source key, caption and the image's size, mtime and SHA-256 (and
  its control image's, for a ControlNet's cache); a changed caption, image or control image is
  refused, naming the files; new images are encoded into new
  shards (incrementally, so an interrupted build resumes where it stopped); images gone from
  the source are left out of training and reported;
- the sample prompts' embeddings (`extras.safetensors`) are re-encoded when the prompts change.
A complete, current cache loads neither model. Images that cannot be read (missing, truncated,
not an image, decompression bombs) are skipped and listed, never fatal.

At the first encoded batch the DC-AE also decodes a few images back: a reconstruction PSNR
under `min_psnr` is warned about (a dataset the autoencoder cannot represent trains noise).
Images smaller than their bin are upscaled; how many, and by how much, is in the summary.

Each cached sample holds the latent (already multiplied by the DC-AE's scaling factor, i.e.
what the DiT trains on; with `flip` also the latent of the mirrored image), for records with a
control image (`Record.control`) the control image's latent, encoded by the same DC-AE at the
image's bin as the official ControlNet pipeline encodes it (mirrored too with `flip`), and the caption
embedding in the encoder's dtype, cut to its unmasked tokens: the DiT's cross-attention gives
masked tokens exactly zero weight, so re-padding with zeros at batch time reproduces the
full-length result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sana.checkpoint import pipeline_subfolder, write_json, write_safetensors
from sana.errors import SanaCheckpointError, SanaInputError
from sana.resolution import closest_bin

from . import distributed
from .data import Bin, Record, bucket_table, image_size, load_fitted, merge_small_buckets

CACHE_VERSION = 3  # 3: settings with content hashes, per-sample keys, incremental shards
SUMMARY = "cache.json"
EXTRAS = "extras.safetensors"
SHARD_GLOB = "shard_*.safetensors"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
PSNR_SAMPLES = 4  # images decoded back at the first batch


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def check_cache_options(**options: int) -> None:
    """`SanaInputError` naming the first of `build_cache`'s size options that is not an integer ≥ 1."""
    for name, value in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SanaInputError(f"--{name.replace('_', '-')} {value!r}: must be an integer ≥ 1")


# --------------------------------------------------------------------------------------------
# What a cache was built from
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSettings:
    """Everything every sample of a cache was encoded with; any change makes the cache stale."""

    resolution: int
    max_length: int
    chi: bool
    flip: bool
    min_bucket_size: int
    dtype: str  # the encoders' compute dtype
    vae: str  # content hash of the DC-AE's files (or weights)
    text_encoder: str  # content hash of the text encoder's files (or weights)
    version: int = CACHE_VERSION
    control: bool = False  # every sample holds a control image's latent (a ControlNet's cache)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if not values["control"]:  # a cache without control images reads as caches did before it
            del values["control"]
        return values

    def changes(self, before: dict) -> list[str]:
        """What differs from the settings `before` (a `to_dict`), one phrase each."""
        names = {"vae": "the DC-AE (--vae, its files' content)", "text_encoder": "the text encoder (--text-encoder, its files' content)",
                 "version": "the cache format version",
                 "control": 'control images (--control-dir, or a manifest\'s "control" key)'}
        absent = {"control": False}
        return [f"{names.get(key, '--' + key.replace('_', '-'))} {_shown(before.get(key, absent.get(key)))} (cache) → {_shown(now)} (now)"
                for key, now in dataclasses.asdict(self).items() if before.get(key, absent.get(key)) != now]


def _shown(value) -> str:
    """A setting for a message: content hashes shortened."""
    return value[:19] + "…" if isinstance(value, str) and value.startswith("sha256:") else repr(value)


def file_sha256(path: Path, memo: dict | None = None) -> str:
    """SHA-256 of a file's content; `memo` ({path: [size, mtime_ns, digest]}) skips files whose
    size and modification time are unchanged since they were hashed."""
    stat = path.stat()
    key = str(path.resolve())
    if memo is not None and memo.get(key, [None, None])[:2] == [stat.st_size, stat.st_mtime_ns]:
        return memo[key][2]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if memo is not None:
        memo[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def model_fingerprint(source, memo: dict | None = None, *, subfolders: Sequence[str] = ()) -> str:
    """"sha256:<hex>" of what a model is made of: a file's content, a folder's files (names and
    contents; in a pipeline root only `subfolders`), or a loaded module's weights."""
    digest = hashlib.sha256()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        roots = [path / s for s in subfolders if (path / s).is_dir()] or [path]
        for root in roots:
            files = [root] if root.is_file() else _folder_files(root)
            for file in files:
                digest.update(f"{file.relative_to(path).as_posix() if file != path else file.name}\0".encode())
                digest.update(file_sha256(file, memo).encode())
    else:
        module = getattr(source, "model", source)  # a TextEncoder holds its Gemma as .model
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        tokenizer = getattr(source, "tokenizer", None)
        if tokenizer is not None:
            digest.update(f"tokenizer\0{len(tokenizer)}".encode())
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------------------------
# What a cache holds
# --------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SanaCheckpointError(f"{path}: unreadable {what} ({error}); rebuild the cache in another folder") from None
    if not isinstance(value, dict):
        raise SanaCheckpointError(f"{path}: not a {what} (a JSON object)")
    return value


def read_metadata(path: Path) -> dict:
    """A safetensors file's metadata (its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for missing or damaged files
        raise SanaCheckpointError(f"{path}: cache shard missing or unreadable ({error}); rebuild the cache") from None


@dataclass
class Contents:
    """The samples and skipped images the shards on disk hold, by source key."""

    shards: dict[int, dict]  # shard index → its metadata (settings, samples, skipped)
    samples: dict[str, dict]
    skipped: dict[str, dict]

    @classmethod
    def read(cls, folder: Path) -> "Contents":
        shards: dict[int, dict] = {}
        for path in sorted(folder.glob(SHARD_GLOB)):
            index = path.stem.removeprefix("shard_")
            if index.isdigit():
                meta = read_metadata(path)
                shards[int(index)] = {key: json.loads(meta.get(key, "null")) for key in ("settings", "samples", "skipped")}
        samples, skipped = {}, {}
        for meta in shards.values():
            skipped.update({entry["key"]: entry for entry in meta["skipped"] or [] if isinstance(entry, dict)})
            samples.update({entry["key"]: entry for entry in meta["samples"] or [] if "key" in entry})
        return cls(shards, samples, {k: v for k, v in skipped.items() if k not in samples})

    def free_indices(self):
        index = 0
        while True:
            if index not in self.shards:
                yield index
            index += 1


def _file_state(path: Path) -> dict:
    try:
        stat = path.stat()
    except OSError:
        return {"bytes": None, "mtime_ns": None}
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _file_changed(entry: dict, path: Path, prefix: str = "") -> bool:
    """Whether a cached file is no longer what was encoded (same size and mtime: same file;
    otherwise its content hash decides); `prefix` "control_" reads the control image's record."""
    now = _file_state(path)
    if now["bytes"] is None:
        return True
    if [now["bytes"], now["mtime_ns"]] == [entry.get(prefix + "bytes"), entry.get(prefix + "mtime_ns")]:
        return False
    return file_sha256(path) != entry.get(prefix + "sha256")


def _control_changed(entry: dict, record: Record) -> bool:
    """Whether a sample's control image is another file, or its file changed, since it was cached."""
    if record.control is None or "control" not in entry:
        return False  # a cache without control images: the settings tell those apart
    return entry["control"] != str(record.control) or _file_changed(entry, record.control, "control_")


@dataclass
class Plan:
    """How the source compares with the cache: what to encode, what changed, what is gone."""

    new: list[Record]
    changed_captions: list[str]
    changed_images: list[str]
    removed: list[str]
    changed_controls: list[str] = dataclasses.field(default_factory=list)


def compare(records: Sequence[Record], contents: Contents) -> Plan:
    new, captions, images, controls = [], [], [], []
    for record in records:
        entry = contents.samples.get(record.key)
        if entry is None:
            skipped = contents.skipped.get(record.key)
            states = {k: v for k, v in _skip_entry(record).items() if k.endswith(("bytes", "mtime_ns"))}
            if skipped is None or states != {k: skipped.get(k) for k in states}:
                new.append(record)  # never seen, or an unreadable image (or control image) that changed since: (re)try it
            continue
        if entry["caption"] != record.caption:
            captions.append(f"{record.key}: {entry['caption']!r} → {record.caption!r}")
        elif _file_changed(entry, record.image):
            images.append(record.key)
        elif _control_changed(entry, record):
            controls.append(f"{record.key} ({record.control})")
    keys = {r.key for r in records}
    return Plan(new, captions, images, sorted(k for k in contents.samples if k not in keys), controls)


def _refuse_changed(out: Path, plan: Plan) -> None:
    if not (plan.changed_captions or plan.changed_images or plan.changed_controls):
        return
    parts = []
    for items, what in ((plan.changed_captions, "caption(s) changed"), (plan.changed_images, "image(s) changed"),
                        (plan.changed_controls, "control image(s) changed")):
        if items:
            parts.append(f"{len(items)} {what} ({'; '.join(items[:3])}{'; ...' if len(items) > 3 else ''})")
    raise SanaCheckpointError(
        f"{out}: the cache no longer matches its data: {', '.join(parts)}; its samples would train on the old ones. "
        "Build into another --cache-dir (or delete this one); new images alone are added to a cache incrementally"
    )


def _refuse_other_settings(out: Path, settings: CacheSettings, contents: Contents, summary: dict) -> None:
    recorded = [("cache.json", summary.get("settings"))] if summary.get("settings") is not None else []
    recorded += [(shard_name(k), meta["settings"]) for k, meta in sorted(contents.shards.items())]
    for where, before in recorded:
        changes = settings.changes(before if isinstance(before, dict) else {})
        if changes:
            raise SanaCheckpointError(
                f"{out} holds a cache built with other settings ({where}): {'; '.join(changes)}. Its samples cannot be "
                "mixed with new ones: build into another --cache-dir (or give the cache's settings)"
            )


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def training_resolution(dit: str | Path, vae: str | Path) -> int:
    """The resolution `dit` was trained at: its latent side (`sample_size`) times the DC-AE's
    compression, both read from the checkpoints' configs (no weights are loaded for the DiT)."""
    from sana.dcae_io import load_dcae, validate_checkpoint
    from sana.dit_io import COMFY_PREFIXES, detect_layout, resolve_config
    from sana.checkpoint import open_checkpoint, strip_prefix

    reader = strip_prefix(open_checkpoint(dit, subfolders=("transformer",)), COMFY_PREFIXES)
    sample_size = resolve_config(reader, detect_layout(reader)).sample_size
    try:
        compression = validate_checkpoint(open_checkpoint(vae, subfolders=("vae",)))[1].spatial_compression
    except SanaCheckpointError:  # a layout only the loader's key renaming reads
        compression = load_dcae(vae).spatial_compression
    return sample_size * compression


def encode_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The encoders' dtype: bf16 on an accelerator and fp32 on the CPU unless given (never fp16:
    the DC-AE's activations overflow it, and Gemma-2's can)."""
    if dtype not in DTYPES:
        raise SanaInputError(f"--dtype {dtype!r}: expected one of {list(DTYPES)}")
    return DTYPES[dtype] or (torch.float32 if device.type == "cpu" else torch.bfloat16)


def build_cache(
    records: Sequence[Record],
    out_dir: str | Path,
    *,
    vae,
    text_encoder,
    resolution: int,
    shard_size: int = 512,
    batch_size: int = 16,
    max_length: int = 300,
    chi: bool = True,
    sample_prompts: Sequence[str] = (),
    flip: bool = False,
    min_bucket_size: int = 1,
    device: str = "cpu",
    dtype: str = "auto",
    min_psnr: float = 20.0,
    progress: bool = True,
) -> dict:
    """Encode `records` into safetensors shards under `out_dir` (or bring an existing cache up to
    date); returns the cache summary (also written to `cache.json`).

    `vae` and `text_encoder` are paths (loaded on `device` in `dtype` only when something must
    be encoded) or loaded models (used as they are). The empty prompt's embedding (for caption
    dropout) and `sample_prompts`' embeddings (for sample grids) go to `extras.safetensors`.
    Records a `Records` left out (no caption, caption not UTF-8, no control image) are counted
    and listed in the summary, as unreadable images are (an unreadable control image skips its
    sample). When the records have control images (`Record.control`, all or none of them),
    each sample also holds its control image's latent (`LatentCache.control`). Raises `SanaCheckpointError` for a cache built from
    other settings or data (naming what changed), `SanaInputError` for unusable options.
    """
    check_cache_options(resolution=resolution, shard_size=shard_size, batch_size=batch_size, max_length=max_length,
                        min_bucket_size=min_bucket_size)
    if not records:
        raise SanaInputError("build_cache: no records to encode (the data source yielded no image with a caption)")
    torch_device = distributed.pick_device(device)
    compute_dtype = encode_dtype(torch_device, dtype)
    out = Path(out_dir)
    summary = _read_json(out / SUMMARY, "cache summary") if (out / SUMMARY).is_file() else {}
    if summary and summary.get("settings", {}).get("version") != CACHE_VERSION:
        raise SanaCheckpointError(f"{out} holds a cache of an earlier version ({summary.get('settings')}); build into another --cache-dir")
    memo = summary.get("file_hashes", {})
    with_control = [r.control is not None for r in records]
    if any(with_control) and not all(with_control):
        missing = [r.key for r in records if r.control is None]
        raise SanaInputError(f"build_cache: {len(missing)} record(s) have no control image ({', '.join(missing[:3])}); "
                             "a ControlNet's cache needs one for every sample")
    settings = CacheSettings(
        resolution=resolution, max_length=max_length, chi=chi, flip=flip, min_bucket_size=min_bucket_size,
        dtype=str(compute_dtype).removeprefix("torch."),
        vae=model_fingerprint(vae, memo, subfolders=("vae",)),
        text_encoder=model_fingerprint(text_encoder, memo, subfolders=("text_encoder", "tokenizer")),
        control=all(with_control),
    )
    contents = Contents.read(out) if out.is_dir() else Contents({}, {}, {})
    _refuse_other_settings(out, settings, contents, summary)
    plan = compare(records, contents)
    _refuse_changed(out, plan)
    extras_current = _extras_current(out, settings, sample_prompts)
    encoders = _Encoders(vae, text_encoder, torch_device, compute_dtype, settings)  # loads them on first use only
    if plan.new or not extras_current:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SUMMARY, {**summary, "settings": settings.to_dict(), "complete": False, "file_hashes": memo})
        if not extras_current:
            encoders.write_extras(out / EXTRAS, sample_prompts)
        if plan.new:
            _encode_new(plan.new, contents, out, encoders, settings, shard_size, batch_size, min_psnr, progress)
            contents = Contents.read(out)
    updated = _summary(settings, contents, plan, records, memo, {**summary, **encoders.report})
    if updated != summary or plan.new or not extras_current:  # the latter two marked it incomplete above
        write_json(out / SUMMARY, updated)
    summary = updated
    if plan.removed:
        warnings.warn(f"{len(plan.removed)} cached image(s) are no longer in the data source and are left out of training "
                      f"({', '.join(plan.removed[:3])}{', ...' if len(plan.removed) > 3 else ''}; listed in {out / SUMMARY})",
                      stacklevel=2)
    if plan.new and summary.get("skipped_count"):
        warnings.warn(f"{summary['skipped_count']} unreadable image(s) skipped while caching (listed in {out / SUMMARY})", stacklevel=2)
    return summary


def _extras_current(out: Path, settings: CacheSettings, sample_prompts: Sequence[str]) -> bool:
    if not (out / EXTRAS).is_file():
        return False
    meta = read_metadata(out / EXTRAS)
    return json.loads(meta.get("sample_prompts", "null")) == list(sample_prompts) and json.loads(meta.get("settings", "null")) == settings.to_dict()


class _Encoders:
    """The DC-AE and the text encoder, loaded on first use, and what the build reports."""

    def __init__(self, vae, text_encoder, device: torch.device, dtype: torch.dtype, settings: CacheSettings):
        self._vae, self._text_encoder = vae, text_encoder
        self.device, self.dtype, self.settings = device, dtype, settings
        self.report: dict = {}

    @property
    def dcae(self):
        if isinstance(self._vae, (str, os.PathLike)):
            from sana.dcae_io import load_dcae

            self._vae = load_dcae(self._vae, dtype=self.dtype, device=self.device)
        return self._vae

    @property
    def text(self):
        if isinstance(self._text_encoder, (str, os.PathLike)):
            from sana.text_encoder import load_text_encoder

            self._text_encoder = load_text_encoder(self._text_encoder, dtype=self.dtype, device=self.device)
        return self._text_encoder

    def encode_texts(self, prompts: Sequence[str], *, chi: bool | None = None) -> list[torch.Tensor]:
        """Per-prompt [L_i, D] embeddings (on the CPU, in the encoder's dtype), cut to the
        attended tokens (masks are a prefix: right-padded)."""
        if not prompts:
            return []
        chi = self.settings.chi if chi is None else chi
        embeds, mask = self.text.encode(list(prompts), chi=chi, max_length=self.settings.max_length)
        return [e[: max(1, int(m.sum()))].cpu().clone() for e, m in zip(embeds, mask)]

    def write_extras(self, path: Path, sample_prompts: Sequence[str]) -> None:
        # The empty prompt is encoded without the CHI, as pipelines encode the negative prompt
        # (`sana.generate`, diffusers): caption dropout then trains exactly the unconditional
        # input that classifier-free guidance feeds at sampling time.
        tensors = {"null_text": self.encode_texts([""], chi=False)[0]}
        tensors.update({f"sample_text.{i}": e for i, e in enumerate(self.encode_texts(list(sample_prompts)))})
        # New sample prompts need the text encoder only: the DC-AE's factor is the earlier file's.
        earlier = read_metadata(path) if path.is_file() else {}
        scaling = earlier["scaling_factor"] if json.loads(earlier.get("settings", "null")) == self.settings.to_dict() else str(self.dcae.scaling_factor)
        write_safetensors(path, tensors, {"sample_prompts": json.dumps(list(sample_prompts)), "scaling_factor": scaling,
                                          "settings": json.dumps(self.settings.to_dict())})

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → the DiT's latents (times the scaling factor), float32 on the CPU."""
        dcae = self.dcae
        latents = dcae.encode(pixels.to(dcae.device, dcae.dtype)).float() * dcae.scaling_factor
        if "psnr_db" not in self.report:
            self.report["psnr_db"] = self._psnr(pixels[:PSNR_SAMPLES], latents[:PSNR_SAMPLES])
        return latents.cpu()

    def _psnr(self, pixels: torch.Tensor, latents: torch.Tensor) -> float:
        """PSNR (dB, peak-to-peak 2) of the DC-AE's reconstruction of `pixels`."""
        dcae = self.dcae
        decoded = dcae.decode((latents / dcae.scaling_factor).to(dcae.dtype)).float().clamp(-1, 1).cpu()
        mse = float((decoded - pixels.float()).square().mean())
        return round(10 * math.log10(4 / mse), 2) if mse > 0 else math.inf


def _new_bins(new: Sequence[Record], contents: Contents, table: dict, min_bucket_size: int) -> tuple[dict, dict]:
    """(key → bin or None for an unreadable header, key → upscale factor) for the new records,
    small buckets merged over the whole cache (`merge_small_buckets`)."""
    bins, upscale = {}, {}
    for record in new:
        size = image_size(record.image)
        if size is None:
            bins[record.key] = None
            continue
        bin_size = closest_bin(*size, table)
        bins[record.key] = bin_size
        upscale[record.key] = max(bin_size[0] / size[0], bin_size[1] / size[1])
    counts = Counter(tuple(entry["bin"]) for entry in contents.samples.values() if entry.get("bin"))
    counts.update(b for b in bins.values() if b is not None)
    moved = merge_small_buckets(counts, min_bucket_size)
    return {key: moved.get(b, b) if b is not None else None for key, b in bins.items()}, upscale


def _encode_new(new: Sequence[Record], contents: Contents, out: Path, encoders: _Encoders, settings: CacheSettings,
                shard_size: int, batch_size: int, min_psnr: float, progress: bool) -> None:
    if settings.resolution < encoders.dcae.spatial_compression:
        raise SanaInputError(f"--resolution {settings.resolution}: smaller than the DC-AE's compression factor "
                             f"{encoders.dcae.spatial_compression}")
    table = bucket_table(settings.resolution, encoders.dcae.spatial_compression)
    bins, upscale = _new_bins(new, contents, table, settings.min_bucket_size)
    encoders.report["upscaled"] = sum(1 for f in upscale.values() if f > 1.0)
    encoders.report["largest_upscale"] = round(max(upscale.values(), default=1.0), 2)
    bar = _progress(len(new), "caching", progress)
    indices = contents.free_indices()
    for start in range(0, len(new), shard_size):
        chunk = new[start : start + shard_size]
        tensors, samples, skipped = _encode_shard(chunk, bins, encoders, batch_size, bar)
        write_safetensors(out / shard_name(next(indices)), tensors, {
            "settings": json.dumps(settings.to_dict()), "samples": json.dumps(samples), "skipped": json.dumps(skipped)})
        if start == 0:
            _warn_about_the_data(encoders.report, settings, min_psnr)
    bar.close()


def _warn_about_the_data(report: dict, settings: CacheSettings, min_psnr: float) -> None:
    psnr = report.get("psnr_db")
    if psnr is not None and min_psnr > 0 and psnr < min_psnr:
        warnings.warn(f"the DC-AE reconstructs these images poorly (PSNR {psnr:.1f} dB on {PSNR_SAMPLES} of them, under "
                      f"--min-psnr {min_psnr:g}): a DiT trained on its latents learns what it cannot represent as noise. "
                      "Check --vae (the DC-AE the DiT generates with) and the images", stacklevel=3)
    if report.get("largest_upscale", 1.0) >= 1.5:
        warnings.warn(f"{report['upscaled']} image(s) are smaller than their bin at --resolution {settings.resolution} and "
                      f"were upscaled (up to {report['largest_upscale']:g}×), which trains blur: give a lower --resolution "
                      "(the model's training resolution) or larger images", stacklevel=3)


@torch.inference_mode()
def _encode_shard(chunk: Sequence[Record], bins: dict, encoders: _Encoders, batch_size: int, bar) -> tuple[dict, list, list]:
    """One shard's tensors and metadata; its images are read one batch (of one bin) at a time."""
    skipped = [_skip_entry(r) for r in chunk if bins[r.key] is None]
    groups: dict[Bin, list[Record]] = {}
    for record in chunk:
        if bins[record.key] is not None:
            groups.setdefault(bins[record.key], []).append(record)
    bar.update(len(skipped))
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict]] = {}
    for size, group in groups.items():
        for start in range(0, len(group), batch_size):
            part = group[start : start + batch_size]
            batch, pixels, controls = [], [], []
            for record in part:
                image = load_fitted(record.image, size=size)
                control = load_fitted(record.control, size=size) if record.control is not None else None
                if image is None or (record.control is not None and control is None):
                    skipped.append(_skip_entry(record))
                    continue
                batch.append(record)
                pixels.append(image)
                controls.append(control)
            if batch:
                control_pixels = torch.stack(controls) if encoders.settings.control else None
                encoded.update(_encode_batch(batch, torch.stack(pixels), control_pixels, size, encoders))
            bar.update(len(part))
    tensors, samples = {}, []
    for record in chunk:  # source order: a rebuilt shard is the same file
        if record.key not in encoded:
            continue
        latents, text, meta = encoded[record.key]
        n = len(samples)
        tensors[f"text.{n}"] = text
        tensors.update({f"{name}.{n}": latent for name, latent in latents.items()})
        samples.append(meta)
    order = {r.key: i for i, r in enumerate(chunk)}
    return tensors, samples, sorted(skipped, key=lambda e: order[e["key"]])


def _encode_batch(batch: list[Record], pixels: torch.Tensor, control_pixels: torch.Tensor | None, size: Bin,
                  encoders: _Encoders) -> dict:
    """key → ({tensor name: latent}, caption embedding, metadata) for one batch of one bin."""
    latents = {"latent": encoders.encode_images(pixels)}
    if control_pixels is not None:
        latents["control"] = encoders.encode_images(control_pixels)
    if encoders.settings.flip:
        latents["latent_flip"] = encoders.encode_images(pixels.flip(-1))
        if control_pixels is not None:
            latents["control_flip"] = encoders.encode_images(control_pixels.flip(-1))
    texts = encoders.encode_texts([r.caption for r in batch])
    del pixels, control_pixels
    result = {}
    for i, record in enumerate(batch):
        meta = {"key": record.key, "image": str(record.image), "caption": record.caption, "sha256": file_sha256(record.image),
                **_file_state(record.image), "size": list(latents["latent"][i].shape[-2:]), "bin": list(size)}
        if record.control is not None:
            meta.update(control=str(record.control), control_sha256=file_sha256(record.control),
                        **{f"control_{k}": v for k, v in _file_state(record.control).items()})
        result[record.key] = ({name: tensor[i].clone() for name, tensor in latents.items()}, texts[i], meta)
    return result


def _skip_entry(record: Record) -> dict:
    """What a skipped sample's files were: a change to either retries it."""
    entry = {"key": record.key, "image": str(record.image), **_file_state(record.image)}
    if record.control is not None:
        entry.update(control=str(record.control), **{f"control_{k}": v for k, v in _file_state(record.control).items()})
    return entry


def _summary(settings: CacheSettings, contents: Contents, plan: Plan, records, memo: dict, report: dict) -> dict:
    """cache.json's content; `report` holds the data checks of this build, else the previous one's."""
    removed = set(plan.removed)
    kept = [entry for key, entry in contents.samples.items() if key not in removed]
    buckets = Counter("x".join(map(str, entry["bin"])) for entry in kept if entry.get("bin"))
    summary = {
        "settings": settings.to_dict(),
        "complete": True,
        "shards": [shard_name(k) for k in sorted(contents.shards)],
        "samples": len(kept),
        "buckets": dict(sorted(buckets.items())),
        "skipped": [entry["image"] for entry in contents.skipped.values()],
        "skipped_count": len(contents.skipped),
        "removed": sorted(removed),
        "removed_count": len(removed),
    }
    for key in ("psnr_db", "upscaled", "largest_upscale"):  # measured on the images a build encoded
        if key in report:
            summary[key] = report[key]
    for key in ("without_caption", "bad_caption", "without_control"):  # left out while reading the source (read_records warned)
        summary[key] = list(getattr(records, key, []))
        summary[f"{key}_count"] = len(summary[key])
    summary["file_hashes"] = memo
    return summary


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or total == 0, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class LatentCache:
    """Random access to a finished cache: `cache[i] -> (latent [c, h, w], text [L, D])`,
    `cache.flipped(i)` the mirrored image's latent (a cache built with flips), `cache.control(i)`
    the control image's latent (a ControlNet's cache: `has_control`).

    Shards are opened lazily (memory-mapped) and a few are kept open; samples whose image left
    the data source (`removed` in cache.json) are not part of it.
    """

    def __init__(self, folder: str | Path, keep_open: int = 4):
        from safetensors import safe_open

        self.folder = Path(folder)
        summary_path = self.folder / SUMMARY
        if not summary_path.is_file() or not _read_json(summary_path, "cache summary").get("complete"):
            raise SanaCheckpointError(f"{self.folder} is not a finished latent cache (no complete cache.json); build it with `python -m trainer cache`")
        self.summary = _read_json(summary_path, "cache summary")
        self.flips = bool(self.summary.get("settings", {}).get("flip"))
        self.has_control = bool(self.summary.get("settings", {}).get("control"))
        removed = set(self.summary.get("removed", []))
        self.index: list[tuple[str, int]] = []
        self.meta: list[dict] = []
        shards = self.summary["shards"]
        names = [shard_name(k) for k in range(shards)] if isinstance(shards, int) else shards  # int: a version-2 cache
        for name in names:
            rows = json.loads(read_metadata(self.folder / name)["samples"])
            for n, row in enumerate(rows):
                if row.get("key", row["image"]) not in removed:
                    self.index.append((name, n))
                    self.meta.append(row)
        if not self.meta:
            raise SanaCheckpointError(f"{self.folder}: the cache holds no sample (every image was unreadable?)")
        self._open: OrderedDict[str, object] = OrderedDict()
        self._keep_open = keep_open
        self._safe_open = safe_open
        with safe_open(str(self.folder / EXTRAS), framework="pt") as f:
            self.null_text = f.get_tensor("null_text")
            extras_meta = f.metadata()
            self.sample_prompts: list[str] = json.loads(extras_meta["sample_prompts"])
            self.sample_texts = [f.get_tensor(f"sample_text.{i}") for i in range(len(self.sample_prompts))]
            self.scaling_factor = float(extras_meta["scaling_factor"])

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, name: str):
        if name not in self._open:
            self._open[name] = self._safe_open(str(self.folder / name), framework="pt")
            if len(self._open) > self._keep_open:
                self._open.popitem(last=False)
        self._open.move_to_end(name)
        return self._open[name]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        name, n = self.index[i]
        shard = self._shard(name)
        return shard.get_tensor(f"latent.{n}"), shard.get_tensor(f"text.{n}")

    def flipped(self, i: int) -> torch.Tensor:
        """The latent of sample `i`'s mirrored image (`SanaInputError` for a cache built without flips)."""
        if not self.flips:
            raise SanaInputError(f"--flip: the cache {self.folder} holds no mirrored images; build one with "
                                 "`python -m trainer cache --flip true` (off by default: captions may name sides)")
        name, n = self.index[i]
        return self._shard(name).get_tensor(f"latent_flip.{n}")

    def control(self, i: int, *, mirrored: bool = False) -> torch.Tensor:
        """The latent of sample `i`'s control image (mirrored: of the mirrored control image, a cache
        built with flips); `SanaInputError` for a cache without control images."""
        if not self.has_control:
            raise SanaInputError(f"--cache-dir {self.folder}: the cache holds no control images; build a ControlNet's cache with "
                                 "`python -m trainer cache --control-dir FOLDER` (or a manifest whose rows have a \"control\" key)")
        if mirrored:
            self.flipped(i)  # the cache's own message when it has no mirrored images
        name, n = self.index[i]
        return self._shard(name).get_tensor(f"{'control_flip' if mirrored else 'control'}.{n}")

    def latent_size(self, i: int) -> tuple[int, int]:
        return tuple(self.meta[i]["size"])

    @property
    def resolution(self) -> int | None:
        """The resolution the cache was built for (its square bin's side)."""
        return self.summary.get("settings", {}).get("resolution")

    @property
    def latent_channels(self) -> int:
        return int(self[0][0].shape[0])

    @property
    def text_dim(self) -> int:
        return int(self.null_text.shape[-1])
