"""Training data: image+caption sources, aspect-ratio buckets, and the latent / text-embedding cache.

Sources are a folder of images with same-name `.txt` captions (first line), or a JSONL
manifest with one `{"image": path, "caption": text}` object per line (paths relative to the
manifest; `file`/`path` and `text`/`prompt` are accepted too). Images without a caption and
captions that are not UTF-8 are left out, counted and reported (`Records`, then the cache
summary); a source that yields nothing is an error naming it.

Each image goes to its aspect-ratio bin through `fit_to_bin`, whose memory is bounded by the
bin whatever the image's size or shape (cut the region, reduce it in uint8, then resample).

`build_cache` encodes every image with the DC-AE and every caption with the text encoder once
and writes safetensors shards; training then reads only the shards, so neither Gemma nor the
DC-AE is in memory while the DiT trains. A shard is written atomically and a rerun skips the
shards already on disk, so an interrupted build resumes where it stopped. Images that cannot
be read (missing, truncated, not an image, decompression bombs) are skipped and counted
(`cache.json` lists them), never fatal.

Each cached sample holds the latent (already multiplied by the DC-AE's scaling factor, i.e.
what the DiT trains on) and the caption embedding cut to its unmasked tokens: the DiT's
cross-attention gives masked tokens exactly zero weight, so re-padding with zeros at batch
time reproduces the full-length result.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sana.checkpoint import write_json, write_safetensors
from sana.errors import SanaCheckpointError, SanaInputError
from sana.resolution import ASPECT_RATIO_512_BIN, BINS_BY_SAMPLE_SIZE, closest_bin

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 2  # 2: null_text encoded without the CHI


@dataclass(frozen=True)
class Record:
    """One training example before encoding."""

    image: Path
    caption: str


class Records(list):
    """The records of a data source, plus what was left out of them and why: `without_caption`
    (images with no caption; manifest rows with none) and `bad_caption` (caption files that are
    not UTF-8 text). `build_cache` copies both into its summary."""

    def __init__(self, records=(), *, without_caption: Sequence[str] = (), bad_caption: Sequence[str] = ()):
        super().__init__(records)
        self.without_caption = list(without_caption)
        self.bad_caption = list(bad_caption)

    def warn(self, source: Path) -> None:
        for paths, what in ((self.without_caption, "image(s) without a caption"),
                            (self.bad_caption, "caption file(s) that are not UTF-8 text")):
            if paths:
                shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
                warnings.warn(f"{source}: {len(paths)} {what} left out ({shown})", stacklevel=3)


def scan_folder(folder: str | Path, *, captions: bool = True) -> Records:
    """Images in `folder` (recursively, sorted) with their same-name `.txt` caption (first line).

    With `captions=False` (an autoencoder's data) images need no caption. Images without one and
    captions that are not UTF-8 are left out, counted and warned about; a folder that yields no
    record is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SanaCheckpointError(f"data folder {folder} does not exist")
    records, without_caption, bad_caption = [], [], []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in images:
        text_path = path.with_suffix(".txt")
        if not text_path.is_file():
            if captions:
                without_caption.append(str(path))
            else:
                records.append(Record(path, ""))
            continue
        try:
            lines = text_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            bad_caption.append(str(text_path))
            continue
        records.append(Record(path, lines[0].strip() if lines else ""))
    found = Records(records, without_caption=without_caption, bad_caption=bad_caption)
    found.warn(folder)
    if not found:
        raise SanaCheckpointError(
            f"data folder {folder}: no usable image ({len(images)} image file(s) with suffix {list(IMAGE_SUFFIXES)}; "
            f"{len(without_caption)} without a same-name .txt caption, {len(bad_caption)} with a caption that is not UTF-8)"
        )
    return found


def read_manifest(path: str | Path) -> Records:
    """Records from a JSONL manifest; malformed lines are skipped with a warning, rows without a
    caption are counted as such."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SanaCheckpointError(f"manifest {path}: cannot be read as UTF-8 text: {error}") from None
    records, without_caption = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = row.get("image") or row.get("file") or row.get("path")
            text = row.get("caption", row.get("text", row.get("prompt")))
            if not isinstance(image, str):
                raise ValueError("needs an image path")
        except (ValueError, AttributeError) as error:
            warnings.warn(f"{path}:{number}: skipped ({error})", stacklevel=2)
            continue
        if not isinstance(text, str):
            without_caption.append(f"{path}:{number}")
            continue
        records.append(Record(path.parent / image, text.strip()))
    found = Records(records, without_caption=without_caption)
    found.warn(path)
    if not found:
        raise SanaCheckpointError(f"manifest {path}: no usable row (each needs an image path and a caption string)")
    return found


def read_records(source: str | Path, *, captions: bool = True) -> Records:
    """A folder or a `.jsonl` manifest."""
    source = Path(source)
    if source.suffix.lower() == ".jsonl":
        return read_manifest(source)
    return scan_folder(source, captions=captions)


def load_fitted(path: Path, table: dict[str, tuple[int, int]]) -> torch.Tensor | None:
    """An image file as `fit_to_bin` makes it at its nearest bin of `table`, or None when it is
    missing, truncated, not an image or a decompression bomb. JPEGs are decoded at the smallest
    1/2, 1/4 or 1/8 scale that still covers the bin."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            height, width = closest_bin(image.height, image.width, table)
            scale = max(height / image.height, width / image.width)
            image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            return fit_to_bin(image, height, width)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        # PIL's UnidentifiedImageError is an OSError; closest_bin's error for a 0-pixel side a ValueError.
        return None


def fit_to_bin(image, height: int, width: int) -> torch.Tensor:
    """A PIL image → float [3, height, width] in [-1, 1]: its centred region of the bin's aspect
    ratio, scaled to the bin (what scaling to cover and centre-cropping give).

    Memory is bounded by the bin, whatever the image's size or shape: the region is cut and
    box-reduced by an integer factor in uint8 to under twice the bin per side before it becomes
    float, and the last, bilinear (antialiased) step starts from there."""
    scale = max(height / image.height, width / image.width)
    crop_height = min(image.height, max(1, round(height / scale)))
    crop_width = min(image.width, max(1, round(width / scale)))
    top, left = (image.height - crop_height) // 2, (image.width - crop_width) // 2
    box = (left, top, left + crop_width, top + crop_height)
    if image.mode != "RGB":  # only the region changes mode
        image = image.crop(box).convert("RGB")
        box = (0, 0, image.width, image.height)
    factor = (max(1, crop_width // width), max(1, crop_height // height))
    region = image.reduce(factor, box=box) if factor != (1, 1) else image.crop(box)
    pixels = torch.from_numpy(np.array(region, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1
    if pixels.shape[-2:] != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return pixels[0].clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


def bucket_table(resolution: int, multiple: int) -> dict[str, tuple[int, int]]:
    """Aspect-ratio bins for a training `resolution` (the square side), sides multiples of `multiple`.

    512/1024/2048/4096 use SANA's own tables; other resolutions scale the 512 table, rounding
    each side to the DC-AE's compression factor (so every bin encodes to a whole latent).
    """
    if resolution // 32 in BINS_BY_SAMPLE_SIZE and resolution % 512 == 0:
        table = BINS_BY_SAMPLE_SIZE[resolution // 32]
        if all(h % multiple == 0 and w % multiple == 0 for h, w in table.values()):
            return dict(table)
    scale = resolution / 512
    table: dict[str, tuple[int, int]] = {}
    for key, (h, w) in ASPECT_RATIO_512_BIN.items():
        side = (max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple))
        if side not in table.values():
            table[key] = side
    return table


def to_bucket(image: np.ndarray, table: dict[str, tuple[int, int]]) -> torch.Tensor:
    """uint8 [H, W, 3] → float [3, h, w] in [-1, 1] at the nearest bin (`fit_to_bin`)."""
    from PIL import Image

    return fit_to_bin(Image.fromarray(np.asarray(image, dtype=np.uint8)), *closest_bin(image.shape[0], image.shape[1], table))


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def check_cache_options(**options: int) -> None:
    """`SanaInputError` naming the first of `build_cache`'s size options that is not an integer ≥ 1."""
    for name, value in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SanaInputError(f"--{name.replace('_', '-')} {value!r}: must be an integer ≥ 1")


def build_cache(
    records: Sequence[Record],
    out_dir: str | Path,
    *,
    dcae,
    text_encoder,
    resolution: int,
    shard_size: int = 512,
    batch_size: int = 16,
    max_length: int = 300,
    chi: bool = True,
    sample_prompts: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """Encode `records` into safetensors shards under `out_dir`; returns the cache summary.

    `dcae` and `text_encoder` may be zero-argument callables that load the model: they are
    called only if some shard is missing, so a complete cache never loads either. The empty
    prompt's embedding (for caption dropout) and `sample_prompts`' embeddings (for sample
    grids during training) are stored in `extras.safetensors`. Records a `Records` left out
    (no caption, caption not UTF-8) are counted and listed in the summary, as unreadable images are.
    """
    check_cache_options(resolution=resolution, shard_size=shard_size, batch_size=batch_size, max_length=max_length)
    if not records:
        raise SanaInputError("build_cache: no records to encode (the data source yielded no image with a caption)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"version": CACHE_VERSION, "resolution": resolution, "max_length": max_length, "chi": chi, "records": len(records)}
    summary_path = out / "cache.json"
    if summary_path.is_file():
        summary = _read_summary(summary_path)
        if summary.get("settings") == settings and summary.get("complete"):
            return summary
        if summary.get("settings") != settings:
            raise SanaCheckpointError(f"{out} holds a cache built with other settings {summary.get('settings')}; use another cache_dir")
    write_json(summary_path, {"settings": settings, "complete": False})

    shards = math.ceil(len(records) / shard_size)
    missing = [k for k in range(shards) if not (out / _shard_name(k)).is_file()]
    need_models = bool(missing) or not (out / "extras.safetensors").is_file()
    if need_models:
        dcae = dcae() if callable(dcae) and not isinstance(dcae, torch.nn.Module) else dcae
        text_encoder = text_encoder() if callable(text_encoder) and not hasattr(text_encoder, "encode") else text_encoder
        if resolution < dcae.spatial_compression:
            raise SanaInputError(f"--resolution {resolution}: smaller than the DC-AE's compression factor {dcae.spatial_compression}")
        table = bucket_table(resolution, dcae.spatial_compression)
        encode_text = _text_encoder_fn(text_encoder, max_length, chi)

    if not (out / "extras.safetensors").is_file():
        # The empty prompt is encoded without the CHI, as pipelines encode the negative prompt
        # (`sana.generate`, diffusers): caption dropout then trains exactly the unconditional
        # input that classifier-free guidance feeds at sampling time.
        embeds, mask = text_encoder.encode([""], chi=False, max_length=max_length)
        tensors = {"null_text": embeds[0, : max(1, int(mask[0].sum()))].float().clone()}
        tensors.update({f"sample_text.{i}": e for i, e in enumerate(encode_text(list(sample_prompts)))})
        write_safetensors(out / "extras.safetensors", tensors, {"sample_prompts": json.dumps(list(sample_prompts)), "scaling_factor": str(dcae.scaling_factor)})

    bar = _progress(len(missing) * shard_size, "caching", progress)
    for k in missing:
        chunk = records[k * shard_size : (k + 1) * shard_size]
        tensors, meta, skipped = _encode_shard(chunk, dcae, encode_text, table, batch_size)
        write_safetensors(out / _shard_name(k), tensors, {"samples": json.dumps(meta), "skipped": json.dumps(skipped)})
        bar.update(len(chunk))
    bar.close()

    samples, skipped = 0, []
    for k in range(shards):
        meta = _read_shard_meta(out / _shard_name(k))
        samples += len(json.loads(meta["samples"]))
        skipped += json.loads(meta["skipped"])
    summary = {"settings": settings, "complete": True, "shards": shards, "samples": samples, "skipped": skipped, "skipped_count": len(skipped)}
    for key in ("without_caption", "bad_caption"):  # left out while reading the source (read_records warned)
        summary[key] = list(getattr(records, key, []))
        summary[f"{key}_count"] = len(summary[key])
    write_json(summary_path, summary)
    if skipped:
        warnings.warn(f"{len(skipped)} unreadable image(s) skipped while caching (listed in {summary_path})", stacklevel=2)
    return summary


def _read_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SanaCheckpointError(f"{path}: unreadable cache summary ({error}); rebuild the cache in another folder") from None
    if not isinstance(summary, dict):
        raise SanaCheckpointError(f"{path}: not a cache summary (a JSON object)")
    return summary


def _text_encoder_fn(text_encoder, max_length: int, chi: bool):
    """prompts → per-prompt [L_i, D] embeddings; each distinct prompt is encoded once per build."""
    memo: dict[str, torch.Tensor] = {}

    def encode(prompts: Sequence[str]) -> list[torch.Tensor]:
        new = list(dict.fromkeys(p for p in prompts if p not in memo))
        if new:
            embeds, mask = text_encoder.encode(new, chi=chi, max_length=max_length)
            # Masks are a prefix (right-padded): keep the attended tokens only.
            memo.update({p: e[: max(1, int(m.sum()))].float().clone() for p, e, m in zip(new, embeds, mask)})
        return [memo[p] for p in prompts]

    return encode


@torch.inference_mode()
def _encode_shard(chunk: Sequence[Record], dcae, encode_text, table, batch_size: int) -> tuple[dict, list, list]:
    pixels: list[tuple[int, torch.Tensor]] = []
    skipped = []
    for i, record in enumerate(chunk):
        image = load_fitted(record.image, table)
        if image is None:
            skipped.append(str(record.image))
            continue
        pixels.append((i, image))
    latents: dict[int, torch.Tensor] = {}
    by_size: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for i, x in pixels:
        by_size.setdefault(tuple(x.shape[-2:]), []).append((i, x))
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            part = group[start : start + batch_size]
            z = dcae.encode(torch.stack([x for _, x in part]).to(dcae.dtype)).float() * dcae.scaling_factor
            latents.update({i: zi.cpu().clone() for (i, _), zi in zip(part, z)})
    kept = [i for i, _ in pixels]
    texts = []
    for start in range(0, len(kept), batch_size):
        texts += encode_text([chunk[i].caption for i in kept[start : start + batch_size]])
    tensors, meta = {}, []
    for n, (i, text) in enumerate(zip(kept, texts)):
        tensors[f"latent.{n}"] = latents[i]
        tensors[f"text.{n}"] = text
        meta.append({"image": str(chunk[i].image), "caption": chunk[i].caption, "size": list(latents[i].shape[-2:])})
    return tensors, meta, skipped


def _read_shard_meta(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception as error:  # safetensors raises its own error types for missing or damaged files
        raise SanaCheckpointError(f"{path}: cache shard missing or unreadable ({error}); rebuild the cache") from None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or total == 0, dynamic_ncols=True)


class LatentCache:
    """Random access to a finished cache: `cache[i] -> (latent [c, h, w], text [L, D])`.

    Shards are opened lazily (memory-mapped) and a few are kept open.
    """

    def __init__(self, folder: str | Path, keep_open: int = 4):
        from safetensors import safe_open

        self.folder = Path(folder)
        summary_path = self.folder / "cache.json"
        if not summary_path.is_file() or not _read_summary(summary_path).get("complete"):
            raise SanaCheckpointError(f"{self.folder} is not a finished latent cache (no complete cache.json); build it with `python -m trainer cache`")
        self.summary = _read_summary(summary_path)
        self.index: list[tuple[int, int]] = []
        self.meta: list[dict] = []
        for k in range(self.summary["shards"]):
            rows = json.loads(_read_shard_meta(self.folder / _shard_name(k))["samples"])
            self.index += [(k, n) for n in range(len(rows))]
            self.meta += rows
        if not self.meta:
            raise SanaCheckpointError(f"{self.folder}: the cache holds no sample (every image was unreadable?)")
        self._open: OrderedDict[int, object] = OrderedDict()
        self._keep_open = keep_open
        self._safe_open = safe_open
        with safe_open(str(self.folder / "extras.safetensors"), framework="pt") as f:
            self.null_text = f.get_tensor("null_text")
            extras_meta = f.metadata()
            self.sample_prompts: list[str] = json.loads(extras_meta["sample_prompts"])
            self.sample_texts = [f.get_tensor(f"sample_text.{i}") for i in range(len(self.sample_prompts))]
            self.scaling_factor = float(extras_meta["scaling_factor"])

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, k: int):
        if k not in self._open:
            self._open[k] = self._safe_open(str(self.folder / _shard_name(k)), framework="pt")
            if len(self._open) > self._keep_open:
                self._open.popitem(last=False)
        self._open.move_to_end(k)
        return self._open[k]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, n = self.index[i]
        shard = self._shard(k)
        return shard.get_tensor(f"latent.{n}"), shard.get_tensor(f"text.{n}")

    def latent_size(self, i: int) -> tuple[int, int]:
        return tuple(self.meta[i]["size"])

    @property
    def latent_channels(self) -> int:
        return int(self[0][0].shape[0])

    @property
    def text_dim(self) -> int:
        return int(self.null_text.shape[-1])


def pad_texts(texts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length [L_i, D] embeddings with zeros → ([B, L, D], mask [B, L])."""
    length = max(t.shape[0] for t in texts)
    embeds = torch.zeros(len(texts), length, texts[0].shape[-1], dtype=texts[0].dtype)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        embeds[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = 1
    return embeds, mask


class BucketBatches:
    """Deterministic batches of same-size samples: batch `b` of epoch `e` depends only on (seed, e).

    Each epoch shuffles the samples, fills one queue per latent size, emits a batch whenever a
    queue holds `batch_size` indices (leftovers are dropped), then shuffles the batch order.
    Resuming at (epoch, batch) therefore needs no saved sampler state, and every rank of a
    distributed run computes the same global batches and takes its own slice.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int):
        largest = max(Counter(map(tuple, sizes)).values(), default=0)
        if largest < batch_size:
            raise SanaInputError(f"--batch-size {batch_size}: no latent size of the cache has that many samples "
                                 f"(the largest group has {largest} of {len(sizes)}); lower it")
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.seed = seed

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        queues: dict[tuple[int, int], list[int]] = {}
        batches = []
        for i in torch.randperm(len(self.sizes), generator=generator).tolist():
            queue = queues.setdefault(self.sizes[i], [])
            queue.append(i)
            if len(queue) == self.batch_size:
                batches.append(queue.copy())
                queue.clear()
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[j] for j in order]

    def iterate(self, epoch: int, batch: int) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, batch index, sample indices) from the given position on, forever."""
        while True:
            batches = self.epoch(epoch)
            for b in range(batch, len(batches)):
                yield epoch, b, batches[b]
            epoch, batch = epoch + 1, 0
