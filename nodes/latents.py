"""What Empty Sana Latent computes (no ComfyUI): zero latents on SANA's aspect-ratio bins, and the
latent constants ComfyUI's SANA latent format declares.

ComfyUI's widget ranges let NaN through (every comparison with NaN is false), so sizes and the
memory of the latents are checked here, `SanaInputError` naming the widget.
"""

from __future__ import annotations

import math

import torch

from ..sana.dcae_tiling import default_memory_budget
from ..sana.errors import SanaInputError, check_integer
from ..sana.resolution import aspect_ratio_bins, check_image_size, closest_bin

# DiT `sample_size` (latent side at the training resolution) per resolution-bin option.
RESOLUTION_BIN_SAMPLE_SIZES: dict[str, int | None] = {"off": None, "512px": 16, "1024px": 32, "2048px": 64, "4096px": 128}

SANA_LATENT_CHANNELS = 32
SANA_COMPRESSION = 32  # DC-AE f32 times DiT patch 1: pixels per latent
SANA_LATENT_SCALE = 0.41407


def snap_to_bins(width: int, height: int, resolution_bins: str) -> tuple[int, int]:
    """(width, height) snapped to the nearest aspect-ratio bin of `resolution_bins`, or unchanged for "off".

    The bin tables are (height, width), so the result keeps a portrait request portrait."""
    if resolution_bins not in RESOLUTION_BIN_SAMPLE_SIZES:
        raise SanaInputError(f"unknown resolution bins {resolution_bins!r}; expected one of {list(RESOLUTION_BIN_SAMPLE_SIZES)}")
    sample_size = RESOLUTION_BIN_SAMPLE_SIZES[resolution_bins]
    if sample_size is None:
        return width, height
    bin_height, bin_width = closest_bin(height, width, aspect_ratio_bins(sample_size))
    return bin_width, bin_height


def empty_latent(
    width: int,
    height: int,
    batch_size: int,
    resolution_bins: str,
    *,
    channels: int = SANA_LATENT_CHANNELS,
    compression: int = SANA_COMPRESSION,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int, int]:
    """(zeros [B, channels, H/compression, W/compression], width, height) after bin snapping.

    Sides must be in [1, `MAX_IMAGE_SIDE`] and the latents must fit in the memory free on
    `device` (`SanaInputError` naming the widget otherwise), checked before allocating."""
    height, width = check_image_size(height, width)
    batch_size = check_integer("batch_size", batch_size, low=1)
    width, height = snap_to_bins(width, height, resolution_bins)
    if width % compression or height % compression:
        raise SanaInputError(f"image size {width}x{height} is not a multiple of {compression} px (one SANA latent)")
    shape = [batch_size, channels, height // compression, width // compression]
    need, free = math.prod(shape) * 4, default_memory_budget(torch.device(device))
    if need > free:
        raise SanaInputError(
            f"batch_size {batch_size} at {width}x{height} px needs {need / 2**30:.1f} GiB of latents on {device}, "
            f"but about {free / 2**30:.1f} GiB is free; lower batch_size or the size"
        )
    return torch.zeros(shape, device=device), width, height


__all__ = ["RESOLUTION_BIN_SAMPLE_SIZES", "SANA_COMPRESSION", "SANA_LATENT_CHANNELS", "SANA_LATENT_SCALE", "empty_latent", "snap_to_bins"]
