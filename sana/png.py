"""Image files: PNGs with text chunks written and read with the standard library only, and any
image read with Pillow.

- `write_png(path, image, text)`: `encode_png`'s bytes written atomically
  (`sana.checkpoint.write_bytes`); `read_image(path)`: any image file as a float tensor.
- `encode_png(image, text)`: one [H, W, 3] float image in [0, 1] as 8-bit RGB PNG bytes, with
  each `text` entry as a text chunk before the pixels: `tEXt` when the text is Latin-1 (what
  the PNG standard allows there), else uncompressed UTF-8 `iTXt`, the choice Pillow makes too,
  so A1111-style readers and Pillow's `image.text` see both kinds the same.
- `read_png_text(path)`: the text chunks of a complete PNG file. It walks the chunk headers
  (the pixel data is skipped, not read) and refuses a file that is not a PNG or does not end
  with its `IEND` chunk where its size says it does: a truncated or overgrown file is never
  taken for a finished image.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import write_bytes
from .errors import SanaCheckpointError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER = struct.Struct(">I4s")  # a chunk's data length and kind
_MAX_TEXT_CHUNK = 1 << 24  # text chunks above this are not metadata we wrote; skipped, not read


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    keyword = key.encode("latin-1")
    if not 1 <= len(keyword) <= 79 or b"\0" in keyword:
        raise ValueError(f"a PNG text key has 1-79 Latin-1 characters, got {key!r}")
    try:
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: keyword, no compression, no language, no translated keyword
        return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def encode_png(image: torch.Tensor, text: Mapping[str, str] | None = None) -> bytes:
    """One [H, W, 3] float image in [0, 1] as 8-bit RGB PNG bytes (values rounded, as
    diffusers' `numpy_to_pil`), with `text` as text chunks."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    height, width, _ = pixels.shape
    # Each scanline starts with filter type 0 (none).
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), pixels.reshape(height, width * 3)], dim=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    chunks = [_chunk(b"IHDR", header)]
    chunks += [_text_chunk(key, value) for key, value in (text or {}).items()]
    chunks += [_chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 6)), _chunk(b"IEND", b"")]
    return SIGNATURE + b"".join(chunks)


def write_png(path: str | os.PathLike, image: torch.Tensor, text: Mapping[str, str] | None = None) -> None:
    """Write one [H, W, 3] float image in [0, 1] as an 8-bit RGB PNG with `text` chunks.

    The write is atomic (`sana.checkpoint.write_bytes`): a failure leaves any earlier file at
    `path` as it was. An `OSError` (disk full, no permission) becomes a `SanaCheckpointError`
    naming the path."""
    write_bytes(Path(path), encode_png(image, text))


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as [1, H, W, 3] float in [0, 1] (needs Pillow, which reads every format)."""
    path = Path(path)
    try:
        from PIL import Image
    except ImportError:
        raise SanaCheckpointError(f"reading the input image {path} needs Pillow (pip install pillow)") from None
    if not path.is_file():
        raise SanaCheckpointError(f"input image {path} does not exist")
    try:
        with Image.open(path) as opened:
            rgb = opened.convert("RGB")
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            return data.reshape(1, rgb.height, rgb.width, 3).float() / 255
    except OSError as error:
        raise SanaCheckpointError(f"cannot read the input image {path}: {error}") from None


def _decode_text(kind: bytes, data: bytes) -> tuple[str, str] | None:
    keyword, _, rest = data.partition(b"\0")
    key = keyword.decode("latin-1")
    if kind == b"tEXt":
        return key, rest.decode("latin-1")
    if kind == b"zTXt":
        return key, zlib.decompress(rest[1:]).decode("latin-1")
    if kind == b"iTXt" and len(rest) >= 2:
        compressed, body = rest[0], rest[2:]
        body = body.split(b"\0", 2)[-1]  # after the language tag and the translated keyword
        return key, (zlib.decompress(body) if compressed else body).decode("utf-8")
    return None


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of the complete PNG file `path` (key -> text; the first of a repeated key).

    Raises `SanaCheckpointError` naming the file when it cannot be read, is not a PNG, or is
    incomplete: its chunks must end with `IEND` exactly at the end of the file."""
    path = Path(path)
    text: dict[str, str] = {}
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(len(SIGNATURE)) != SIGNATURE:
                raise SanaCheckpointError(f"{path}: not a PNG file")
            while True:
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    raise SanaCheckpointError(f"{path}: incomplete PNG (no IEND chunk; truncated at byte {f.tell()})")
                length, kind = _HEADER.unpack(header)
                if kind == b"IEND":
                    end = f.tell() + length + 4
                    if end != size:
                        raise SanaCheckpointError(f"{path}: damaged PNG (IEND ends at byte {end}, the file has {size})")
                    return text
                if kind in (b"tEXt", b"zTXt", b"iTXt") and length <= _MAX_TEXT_CHUNK:
                    data = f.read(length)
                    f.seek(4, os.SEEK_CUR)  # the CRC
                    try:
                        decoded = _decode_text(kind, data)
                    except (UnicodeDecodeError, zlib.error):
                        decoded = None
                    if decoded is not None:
                        text.setdefault(*decoded)
                else:
                    f.seek(length + 4, os.SEEK_CUR)
                if f.tell() > size:
                    raise SanaCheckpointError(f"{path}: incomplete PNG (a chunk runs past the end of the file)")
    except OSError as error:
        raise SanaCheckpointError(f"cannot read {path}: {error}") from None


__all__ = ["encode_png", "read_image", "read_png_text", "write_png"]
