"""PNG outputs drawn with Pillow alone (the loss curve and labelled image grids, no matplotlib), and
the conversions between uint8 images and the float tensors the models take and give."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def read_loss_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(log_path: str | Path, png_path: str | Path, *, key: str = "loss", size: tuple[int, int] = (800, 400)) -> bool:
    """Draw `key` against `step` from a JSONL log (raw points and a running mean). False if empty."""
    from PIL import Image, ImageDraw

    rows = [r for r in read_loss_log(log_path) if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not rows:
        return False
    steps = np.array([r["step"] for r in rows], dtype=np.float64)
    values = np.array([r[key] for r in rows], dtype=np.float64)
    window = max(1, len(values) // 20)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    width, height = size
    left, right, top, bottom = 60, 20, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1e-8
    x0, x1 = float(steps.min()), float(steps.max()) if steps.max() > steps.min() else float(steps.min()) + 1

    def point(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = top + (hi - value) / (hi - lo) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        y = point(x0, value)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((2, y - 6), f"{value:.4g}", fill="black")
    draw.text((left, height - bottom + 6), f"step {int(x0)}", fill="black")
    draw.text((width - right - 90, height - bottom + 6), f"step {int(x1)}", fill="black")
    draw.text((width // 2 - 20, height - 18), key, fill="black")
    draw.line([point(s, v) for s, v in zip(steps, values)], fill=(170, 190, 230), width=1)
    if len(smooth) > 1:
        draw.line([point(s, v) for s, v in zip(steps[window - 1 :], smooth)], fill=(20, 60, 200), width=2)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    image.save(png_path)
    return True


def image_grid(images: Sequence[np.ndarray], labels: Sequence[str] = (), *, columns: int | None = None, scale: int = 1) -> "Image.Image":
    """uint8 [H, W, 3] images in a grid, each with its label written below it (wrapped)."""
    from PIL import Image, ImageDraw

    columns = columns or min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    h, w = images[0].shape[0] * scale, images[0].shape[1] * scale
    cell_w = max(w, 128)
    chars = max(8, cell_w // 6)
    wrapped = [_wrap(label, chars) for label in labels] if labels else [[] for _ in images]
    text_h = 12 * max((len(lines) for lines in wrapped), default=0) + (4 if labels else 0)
    grid = Image.new("RGB", (columns * (cell_w + 4) + 4, rows * (h + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, array in enumerate(images):
        r, c = divmod(i, columns)
        x, y = 4 + c * (cell_w + 4), 4 + r * (h + text_h + 4)
        tile = Image.fromarray(np.asarray(array, dtype=np.uint8))
        if scale != 1:
            tile = tile.resize((w, h), Image.NEAREST)
        grid.paste(tile, (x + (cell_w - w) // 2, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + h + 2 + 12 * j), line, fill="black")
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def from_uint8(images: Sequence[np.ndarray]) -> "torch.Tensor":
    """uint8 [H, W, 3] images → a float [B, 3, H, W] batch in [-1, 1] (what the DC-AE encodes)."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images) -> list[np.ndarray]:
    """Images [B, H, W, 3] in [0, 1] (what `sana.generate` and `sana.sampling.latents_to_images`
    return) → a list of uint8 [H, W, 3] arrays."""
    return list((images.float().clamp(0, 1) * 255).round().byte().cpu().numpy())
