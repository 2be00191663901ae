"""Training data: image+caption sources, aspect-ratio buckets and deterministic batches.

Sources are a folder of images with same-name `.txt` captions (first line), or a JSONL
manifest with one `{"image": path, "caption": text}` object per line (paths relative to the
manifest; `file`/`path` and `text`/`prompt` are accepted too). Images without a caption and
captions that are not UTF-8 are left out, counted and reported (`Records`, then the cache
summary); a source that yields nothing is an error naming it. Each record has a `key`, its
image's path as the source names it, which the cache (`trainer.cache`) tracks it by.

A ControlNet's data adds a control image per record (`Record.control`): in a folder given as
`control_dir`, at the image's path relative to the data folder (same name), or a manifest row's
`"control"` path. Records whose control image is missing are left out and reported
(`without_control`), as captionless images are.

Each image goes to its aspect-ratio bin through `fit_to_bin`, whose memory is bounded by the
bin whatever the image's size or shape (cut the region, reduce it in uint8, then resample);
`image_size` reads only the header, so bins are chosen (and small buckets merged,
`merge_small_buckets`) before any pixel is decoded.

`BucketBatches` makes the batches: same-size samples, each repeated `repeats` times an epoch,
a pure function of (seed, epoch); `unusable` names the buckets too small for one batch.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sana.errors import SanaCheckpointError, SanaInputError
from sana.resolution import ASPECT_RATIO_512_BIN, BINS_BY_SAMPLE_SIZE, closest_bin

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Record:
    """One training example before encoding; `key` names it in its source (the image's path
    relative to the folder, or as the manifest writes it)."""

    image: Path
    caption: str
    key: str = ""
    control: Path | None = None  # the control image of a ControlNet's training sample

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.image.as_posix())


class Records(list):
    """The records of a data source, plus what was left out of them and why: `without_caption`
    (images with no caption; manifest rows with none), `bad_caption` (caption files that are
    not UTF-8 text) and `without_control` (a ControlNet's images without a control image).
    `build_cache` copies them into its summary."""

    def __init__(self, records=(), *, without_caption: Sequence[str] = (), bad_caption: Sequence[str] = (),
                 without_control: Sequence[str] = ()):
        super().__init__(records)
        self.without_caption = list(without_caption)
        self.bad_caption = list(bad_caption)
        self.without_control = list(without_control)

    def warn(self, source: Path) -> None:
        for paths, what in ((self.without_caption, "image(s) without a caption"),
                            (self.bad_caption, "caption file(s) that are not UTF-8 text"),
                            (self.without_control, "image(s) without a control image")):
            if paths:
                shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
                warnings.warn(f"{source}: {len(paths)} {what} left out ({shown})", stacklevel=3)


def scan_folder(folder: str | Path, *, captions: bool = True, control_dir: str | Path | None = None) -> Records:
    """Images in `folder` (recursively, sorted) with their same-name `.txt` caption (first line),
    and with `control_dir` their same-name control image there (a `control_dir` inside `folder`
    is not scanned for training images).

    With `captions=False` (an autoencoder's data) images need no caption. Images without one (or
    without a control image), and captions that are not UTF-8 are left out, counted and warned
    about; a folder that yields no record is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SanaCheckpointError(f"data folder {folder} does not exist")
    if control_dir is not None and not Path(control_dir).is_dir():
        raise SanaInputError(f"--control-dir {control_dir}: no such folder")
    records, without_caption, bad_caption, without_control = [], [], [], []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if control_dir is not None:
        controls = Path(control_dir).resolve()
        images = [p for p in images if not p.resolve().is_relative_to(controls)]
    for path in images:
        control = None
        if control_dir is not None:
            control = Path(control_dir) / path.relative_to(folder)
            if not control.is_file():
                without_control.append(str(path))
                continue
        text_path = path.with_suffix(".txt")
        if not text_path.is_file():
            if captions:
                without_caption.append(str(path))
            else:
                records.append(Record(path, "", path.relative_to(folder).as_posix()))
            continue
        try:
            lines = text_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            bad_caption.append(str(text_path))
            continue
        records.append(Record(path, lines[0].strip() if lines else "", path.relative_to(folder).as_posix(), control))
    found = Records(records, without_caption=without_caption, bad_caption=bad_caption, without_control=without_control)
    found.warn(folder)
    if not found:
        controls = f", {len(without_control)} without a same-name control image in {control_dir}" if control_dir is not None else ""
        raise SanaCheckpointError(
            f"data folder {folder}: no usable image ({len(images)} image file(s) with suffix {list(IMAGE_SUFFIXES)}; "
            f"{len(without_caption)} without a same-name .txt caption, {len(bad_caption)} with a caption that is not UTF-8"
            f"{controls})"
        )
    return found


def read_manifest(path: str | Path) -> Records:
    """Records from a JSONL manifest; malformed lines are skipped with a warning, rows without a
    caption are counted as such. When any row names a `"control"` image (a ControlNet's data),
    rows without one are left out and counted (`without_control`)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SanaCheckpointError(f"manifest {path}: cannot be read as UTF-8 text: {error}") from None
    records, without_caption, without_control = [], [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = row.get("image") or row.get("file") or row.get("path")
            text = row.get("caption", row.get("text", row.get("prompt")))
            control = row.get("control")
            if not isinstance(image, str):
                raise ValueError("needs an image path")
            if control is not None and not isinstance(control, str):
                raise ValueError('"control" must be an image path')
        except (ValueError, AttributeError) as error:
            warnings.warn(f"{path}:{number}: skipped ({error})", stacklevel=2)
            continue
        if not isinstance(text, str):
            without_caption.append(f"{path}:{number}")
            continue
        records.append(Record(path.parent / image, text.strip(), image, path.parent / control if control else None))
    if any(r.control is not None for r in records):
        without_control = [r.key for r in records if r.control is None]
        records = [r for r in records if r.control is not None]
    found = Records(records, without_caption=without_caption, without_control=without_control)
    found.warn(path)
    if not found:
        raise SanaCheckpointError(f"manifest {path}: no usable row (each needs an image path and a caption string)")
    return found


def read_records(source: str | Path, *, captions: bool = True, control_dir: str | Path | None = None) -> Records:
    """A folder (with `control_dir`, its images' control images) or a `.jsonl` manifest."""
    source = Path(source)
    if source.suffix.lower() == ".jsonl":
        if control_dir is not None:
            raise SanaInputError(f"--control-dir {control_dir}: for an image folder; a JSONL manifest ({source}) names each "
                                 'row\'s control image in its "control" key')
        return read_manifest(source)
    return scan_folder(source, captions=captions, control_dir=control_dir)


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of an image file from its header alone, or None when it cannot be opened
    as an image (missing, not an image, a decompression bomb)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def load_fitted(path: Path, table: dict[str, tuple[int, int]] | None = None, *, size: tuple[int, int] | None = None) -> torch.Tensor | None:
    """An image file as `fit_to_bin` makes it at its nearest bin of `table` (or at `size`, a bin
    chosen by the caller), or None when it is missing, truncated, not an image or a
    decompression bomb. JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale that still
    covers the bin."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            height, width = size or closest_bin(image.height, image.width, table)
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


Bin = tuple[int, int]


def merge_small_buckets(counts: dict[Bin, int], min_size: int) -> dict[Bin, Bin]:
    """Where each bin's images go so that no bucket holds fewer than `min_size` images: the
    smallest bucket below it moves into the bucket nearest in aspect ratio (log h/w), until none
    is below or one bucket is left. Returns {bin: target} for the bins that move."""
    sizes = {b: n for b, n in counts.items() if n > 0}
    moved: dict[Bin, Bin] = {}
    while len(sizes) > 1:
        small = min(sizes, key=lambda b: (sizes[b], b))
        if sizes[small] >= min_size:
            break
        ratio = math.log(small[0] / small[1])
        target = min((b for b in sizes if b != small), key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -sizes[b], b))
        sizes[target] += sizes.pop(small)
        moved = {b: (target if t == small else t) for b, t in moved.items()}
        moved[small] = target
    return moved


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

    Each epoch shuffles the samples (each `repeats` times), fills one queue per latent size,
    emits a batch whenever a queue holds `batch_size` indices (leftovers wait for another
    epoch's shuffle), then shuffles the batch order. Resuming at (epoch, batch) therefore needs
    no saved sampler state, and every rank of a distributed run computes the same global batches
    and takes its own slice. A size with fewer than `batch_size` samples never fills a batch:
    `unusable` lists them (the trainer reports them; `python -m trainer cache --min-bucket-size`
    merges them).
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int, repeats: int = 1):
        counts = Counter(map(tuple, sizes))
        largest = max(counts.values(), default=0) * repeats
        if largest < batch_size:
            raise SanaInputError(f"--batch-size {batch_size}: no latent size of the cache has that many samples "
                                 f"(the largest group has {largest} of {len(sizes) * repeats} with --repeats {repeats}); lower it")
        self.sizes = [tuple(s) for s in sizes]
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = repeats
        self.unusable = {size: n for size, n in sorted(counts.items()) if n * repeats < batch_size}

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        queues: dict[tuple[int, int], list[int]] = {}
        batches = []
        count = len(self.sizes)
        for entry in torch.randperm(count * self.repeats, generator=generator).tolist():
            i = entry % count
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
