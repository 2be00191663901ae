"""Memory-bounded DC-AE encode/decode: batch slicing, then overlapping tiles with a smooth blend.

A plan is chosen per call from an estimate of the peak activation memory (weights not
included) against a budget in bytes:

1. the whole batch at once, if it fits;
2. else a few images at a time (exactly the untiled result);
3. else overlapping tiles of `tile_size` image pixels (default `DEFAULT_TILE_SIZE`, halved
   until the tile fits the budget), blended with raised-cosine ramps across each overlap.

The tiles sit on the latent grid, spread evenly so that every tile is full-size (a ragged
edge tile would see a very different global attention context) and neighbours overlap by at
least `tile_overlap` pixels. The blend weights of each axis form a partition of unity, so
the result needs no final division and every pixel is a convex mix of tile outputs.

DC-AE's attention is global over the feature map, so a tile's output differs from the
untiled one everywhere, not only at seams; `docs/BENCHMARKS.md` gives the measured PSNR that
the default tile and overlap were chosen from.

`run_tiled` reports `progress(done, total)` over the network calls (chunks and tiles) of its
plan, so a caller can show a bar without re-deriving the plan. The module knows the DC-AE only
through its config (`sana/dcae_config.py`) and the `Tileable` protocol; `sana.dcae.DCAE`
calls it from `encode` / `decode`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Protocol

import torch

from .dcae_config import RESBLOCK, DCAEConfig
from .errors import SanaInputError

TileProgress = Callable[[int, int], None]
"""(network calls done, total) -> None: called before the first call and after each one."""


class Tileable(Protocol):
    """What the tiler needs from a DC-AE (`sana.dcae.DCAE` is one)."""

    config: DCAEConfig
    encoder: torch.nn.Module
    decoder: torch.nn.Module
    memory_budget: int | None  # bytes; None: what the device has free

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

# In image pixels. A 1024 px tile is 32×32 latents for f32 (SANA's 1024² training size), where
# the attention context is what the model was trained on; 256 px of overlap keeps the blend
# zone wide enough that the tiles' global-context differences fade in smoothly.
DEFAULT_TILE_SIZE = 1024
DEFAULT_TILE_OVERLAP = 256
# Tiles are never shrunk below this when the budget is tight (then the budget is exceeded).
MIN_TILE_SIZE = 256
# Used when the device cannot say how much memory it has free.
FALLBACK_MEMORY_BUDGET = 8 * 1024**3


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Start/end of full-size tiles covering [0, length), neighbours overlapping by >= `overlap`."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1)
    return [(round(k * step), round(k * step) + tile) for k in range(count)]


def _ramp(length: int, rising: bool, device: torch.device) -> torch.Tensor:
    # Raised cosine sampled at pixel centres: two complementary ramps sum to exactly 1.
    t = (torch.arange(length, device=device, dtype=torch.float32) + 0.5) / length
    up = 0.5 - 0.5 * torch.cos(math.pi * t)
    return up if rising else 1.0 - up


def blend_weights(spans: list[tuple[int, int]], scale: int, device: torch.device) -> list[torch.Tensor]:
    """1-D weights (in output pixels, `scale` per grid unit) per span, summing to 1 at every pixel."""
    weights = []
    for k, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale, device=device)
        if k > 0 and spans[k - 1][1] > start:
            width = (spans[k - 1][1] - start) * scale
            w[:width] *= _ramp(width, True, device)
        if k + 1 < len(spans) and spans[k + 1][0] < end:
            width = (end - spans[k + 1][0]) * scale
            w[-width:] *= _ramp(width, False, device)
        weights.append(w)
    total = torch.zeros(spans[-1][1] * scale, device=device)
    for (start, _), w in zip(spans, weights):
        total[start * scale : start * scale + w.numel()] += w
    # Only matters where three tiles overlap (tiny images); elsewhere the ramps already sum to 1.
    return [w / total[start * scale : start * scale + w.numel()] for (start, _), w in zip(spans, weights)]


# ----------------------------------------------------------------------------- memory estimate


def _resblock_bytes(channels: int, pixels: int, elem: int) -> int:
    # input (kept for the residual) + conv1 + activation + conv2 live together, plus fp32 norm temporaries
    return channels * pixels * (3 * elem + 2 * 4)


def _evit_bytes(channels: int, pixels: int, elem: int, scales: int) -> int:
    groups = 1 + scales
    upcast = 0 if elem == 4 else 3 * groups * 4  # the fp32 copy of the concatenated qkv
    attention = elem + 3 * groups * elem + upcast + 4 * groups * 4  # x, qkv⊕branches, relu(q), relu(k), numerator, ratio
    glu = 17 * elem + 2 * 4  # x, 8C expansion, its activation, then the 4C gate and product
    return channels * pixels * max(attention, glu)


def _stage_peak(kind: str, channels: int, pixels: int, elem: int, scales: int) -> int:
    if kind == RESBLOCK:
        return _resblock_bytes(channels, pixels, elem)
    return _evit_bytes(channels, pixels, elem, scales)


def estimate_peak_bytes(config: DCAEConfig, direction: str, batch: int, latent_h: int, latent_w: int, dtype: torch.dtype) -> int:
    """Rough upper estimate of peak activation bytes of one untiled encode or decode.

    Walks the stages: each block keeps a few feature maps of its width alive at once; the
    attention keeps ~(3 + 4)·(1 + scales) channel copies in fp32. Weights are not counted.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    stages = config.num_stages

    def pixels(stage: int) -> int:
        side = 2 ** (stages - 1 - stage)
        return batch * latent_h * side * latent_w * side

    image_bytes = config.in_channels * pixels(0) * elem
    peak = 0
    if direction == "decode":
        widths, depths = config.decoder_widths, config.decoder_depths
        kinds, scales = config.decoder_block_types, config.decoder_qkv_multiscales
        peak = max(peak, (config.latent_channels + 3 * widths[-1]) * pixels(stages - 1) * elem)
        for i in reversed(range(stages)):
            if depths[i] == 0:
                continue
            if i < stages - 1:
                c_in, c_out, p_in = widths[i + 1], widths[i], pixels(i + 1)
                if config.upsample_block_type == "interpolate":
                    # folded nearest ×2 + conv: input, output, and one parity's conv output, sum and shortcut
                    upsample = c_in + 4 * c_out + 3 * c_out
                else:  # conv output, then the shortcut's repeated and shuffled copies
                    upsample = c_in + 12 * c_out
                peak = max(peak, p_in * elem * upsample)
            peak = max(peak, _stage_peak(kinds[i], widths[i], pixels(i), elem, len(scales[i])))
        head = widths[0] if depths[0] > 0 else widths[1]
        head_pixels = pixels(0) if depths[0] > 0 else pixels(1)
        peak = max(peak, head * head_pixels * (2 * elem + 2 * 4) + 2 * image_bytes)
        return peak + image_bytes
    widths, depths = config.encoder_widths, config.encoder_depths
    kinds, scales = config.encoder_block_types, config.encoder_qkv_multiscales
    first = widths[0] if depths[0] > 0 else widths[1]
    peak = max(peak, image_bytes + 2 * first * pixels(0) * elem)
    for i in range(stages):
        if depths[i] == 0:
            continue
        peak = max(peak, _stage_peak(kinds[i], widths[i], pixels(i), elem, len(scales[i])))
        if i < stages - 1:
            peak = max(peak, pixels(i) * elem * (3 * widths[i] + widths[i + 1]))
    return peak + image_bytes


def default_memory_budget(device: torch.device) -> int:
    """What the device has free now: CUDA free + cached-but-unused memory, or 80% of available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.9 * (free + cached))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.8 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        try:
            return int(0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return FALLBACK_MEMORY_BUDGET


# ----------------------------------------------------------------------------- planning and running


def _grid_units(value: int, f: int, what: str, smallest: int) -> int:
    if not isinstance(value, int) or value < smallest * f or value % f:
        raise SanaInputError(
            f"DC-AE {what} must be a multiple of the compression {f} px and at least {smallest * f} px, got {value!r}"
        )
    return value // f


def plan_tiling(
    model: Tileable,
    direction: str,
    shape: tuple[int, ...],
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    memory_budget: int | None = None,
) -> tuple[int, int | None, int]:
    """(images per chunk, tile side in latents or None for untiled, overlap in latents)."""
    config = model.config
    f = config.spatial_compression
    batch = shape[0]
    latent_h, latent_w = (shape[2], shape[3]) if direction == "decode" else (shape[2] // f, shape[3] // f)
    budget = memory_budget if memory_budget is not None else model.memory_budget
    if budget is None:
        budget = default_memory_budget(model.device)
    dtype = model.dtype

    def fits(images: int, h: int, w: int) -> bool:
        return estimate_peak_bytes(config, direction, images, h, w, dtype) <= budget

    def largest_chunk(h: int, w: int) -> int:
        per_image = estimate_peak_bytes(config, direction, 1, h, w, dtype)
        return max(1, min(batch, budget // max(per_image, 1)))

    overlap_units = _grid_units(tile_overlap, f, "tile_overlap", 0) if tile_overlap is not None else None
    if tile_size is not None:
        tile = _grid_units(tile_size, f, "tile_size", 1)
    else:
        if fits(batch, latent_h, latent_w):
            return batch, None, 0
        if fits(1, latent_h, latent_w):
            return largest_chunk(latent_h, latent_w), None, 0
        tile = max(1, DEFAULT_TILE_SIZE // f)
        floor = max(1, MIN_TILE_SIZE // f)
        while tile > floor and not fits(1, min(tile, latent_h), min(tile, latent_w)):
            tile = max(floor, tile // 2)
    if overlap_units is None:
        # The default overlap keeps its ratio to the tile when the tile is not the default one.
        overlap_units = (DEFAULT_TILE_OVERLAP * tile) // DEFAULT_TILE_SIZE
    if 2 * overlap_units > tile:
        raise SanaInputError(
            f"DC-AE tile_overlap {overlap_units * f} px is more than half the tile_size {tile * f} px"
        )
    if latent_h <= tile and latent_w <= tile:
        return largest_chunk(latent_h, latent_w), None, 0
    return largest_chunk(min(tile, latent_h), min(tile, latent_w)), tile, overlap_units


def tiled_apply(
    network: torch.nn.Module,
    x: torch.Tensor,
    direction: str,
    f: int,
    tile: int,
    overlap: int,
    on_call: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run `network` (encoder or decoder) on overlapping tiles of `x` and blend the outputs;
    `on_call()` after each tile."""
    if direction == "decode":
        grid_h, grid_w, in_scale, out_scale = x.shape[2], x.shape[3], 1, f
    else:
        grid_h, grid_w, in_scale, out_scale = x.shape[2] // f, x.shape[3] // f, f, 1
    rows = tile_spans(grid_h, tile, overlap)
    cols = tile_spans(grid_w, tile, overlap)
    row_weights = blend_weights(rows, out_scale, x.device)
    col_weights = blend_weights(cols, out_scale, x.device)
    out = None
    for (top, bottom), wy in zip(rows, row_weights):
        for (left, right), wx in zip(cols, col_weights):
            piece = network(x[:, :, top * in_scale : bottom * in_scale, left * in_scale : right * in_scale])
            if out is None:
                out = torch.zeros(x.shape[0], piece.shape[1], grid_h * out_scale, grid_w * out_scale,
                                  device=x.device, dtype=torch.float32)
            window = out[:, :, top * out_scale : bottom * out_scale, left * out_scale : right * out_scale]
            window.addcmul_(piece.float(), wy[:, None] * wx[None, :])
            del piece
            if on_call is not None:
                on_call()
    return out.to(x.dtype)


def network_calls(shape: tuple[int, ...], direction: str, f: int, chunk: int, tile: int | None, overlap: int) -> int:
    """How many encoder/decoder calls a plan makes for an input of `shape`: one per chunk of
    images, times the tiles of each when tiled."""
    chunks = math.ceil(shape[0] / chunk)
    if tile is None:
        return chunks
    grid_h, grid_w = (shape[2], shape[3]) if direction == "decode" else (shape[2] // f, shape[3] // f)
    return chunks * len(tile_spans(grid_h, tile, overlap)) * len(tile_spans(grid_w, tile, overlap))


def run_tiled(
    model: Tileable,
    direction: str,
    x: torch.Tensor,
    tile_size: int | None,
    tile_overlap: int | None,
    memory_budget: int | None,
    progress: TileProgress | None = None,
) -> torch.Tensor:
    """Encode or decode `x`, sliced and tiled as `plan_tiling` decides, calling
    `progress(done, total)` before the first network call and after each one."""
    network = model.decoder if direction == "decode" else model.encoder
    chunk, tile, overlap = plan_tiling(model, direction, tuple(x.shape), tile_size, tile_overlap, memory_budget)
    f = model.config.spatial_compression
    on_call = None
    if progress is not None:
        total = network_calls(tuple(x.shape), direction, f, chunk, tile, overlap)
        done = 0
        progress(done, total)

        def on_call() -> None:
            nonlocal done
            done += 1
            progress(done, total)

    outputs = []
    for part in x.split(chunk):
        if tile is None:
            outputs.append(network(part))
            if on_call is not None:
                on_call()
        else:
            outputs.append(tiled_apply(network, part, direction, f, tile, overlap, on_call))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
