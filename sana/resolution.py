"""Aspect-ratio bins and the resize-and-crop back to the requested size.

SANA generates at the trained resolution bin nearest the requested aspect ratio, then
resizes and centre-crops the decoded image to the size that was asked for (diffusers'
`use_resolution_binning=True`, NVlabs' `*_TEST` tables). Keys are rounded height/width
ratios; values are (height, width) in pixels.

`check_image_size` holds every requested size to 1..`MAX_IMAGE_SIDE` pixels a side before
anything is allocated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import SanaInputError, check_integer

# The largest image side accepted anywhere (`generate`, the CLI, Empty Sana Latent): ComfyUI's
# MAX_RESOLUTION and four times the largest trained bin side (4096 px). The decoded image alone
# takes 3 x 4 bytes a pixel in float32, 3 GiB at 16384 x 16384; far larger requests would
# allocate until the process dies instead of failing.
MAX_IMAGE_SIDE = 16384

# The PixArt-alpha 1024 table (33 bins), shared by SANA's 1024 models.
ASPECT_RATIO_1024_BIN: dict[str, tuple[int, int]] = {
    "0.25": (512, 2048),
    "0.28": (512, 1856),
    "0.32": (576, 1792),
    "0.33": (576, 1728),
    "0.35": (576, 1664),
    "0.4": (640, 1600),
    "0.42": (640, 1536),
    "0.48": (704, 1472),
    "0.5": (704, 1408),
    "0.52": (704, 1344),
    "0.57": (768, 1344),
    "0.6": (768, 1280),
    "0.68": (832, 1216),
    "0.72": (832, 1152),
    "0.78": (896, 1152),
    "0.82": (896, 1088),
    "0.88": (960, 1088),
    "0.94": (960, 1024),
    "1.0": (1024, 1024),
    "1.07": (1024, 960),
    "1.13": (1088, 960),
    "1.21": (1088, 896),
    "1.29": (1152, 896),
    "1.38": (1152, 832),
    "1.46": (1216, 832),
    "1.67": (1280, 768),
    "1.75": (1344, 768),
    "2.0": (1408, 704),
    "2.09": (1472, 704),
    "2.4": (1536, 640),
    "2.5": (1600, 640),
    "3.0": (1728, 576),
    "4.0": (2048, 512),
}

# The PixArt-Sigma 2048 table (40 bins: the 1024 ratios doubled plus seven extreme ones).
ASPECT_RATIO_2048_BIN: dict[str, tuple[int, int]] = {
    "0.25": (1024, 4096),
    "0.26": (1024, 3968),
    "0.27": (1024, 3840),
    "0.28": (1024, 3712),
    "0.32": (1152, 3584),
    "0.33": (1152, 3456),
    "0.35": (1152, 3328),
    "0.4": (1280, 3200),
    "0.42": (1280, 3072),
    "0.48": (1408, 2944),
    "0.5": (1408, 2816),
    "0.52": (1408, 2688),
    "0.57": (1536, 2688),
    "0.6": (1536, 2560),
    "0.68": (1664, 2432),
    "0.72": (1664, 2304),
    "0.78": (1792, 2304),
    "0.82": (1792, 2176),
    "0.88": (1920, 2176),
    "0.94": (1920, 2048),
    "1.0": (2048, 2048),
    "1.07": (2048, 1920),
    "1.13": (2176, 1920),
    "1.21": (2176, 1792),
    "1.29": (2304, 1792),
    "1.38": (2304, 1664),
    "1.46": (2432, 1664),
    "1.67": (2560, 1536),
    "1.75": (2688, 1536),
    "2.0": (2816, 1408),
    "2.09": (2944, 1408),
    "2.4": (3072, 1280),
    "2.5": (3200, 1280),
    "2.89": (3328, 1152),
    "3.0": (3456, 1152),
    "3.11": (3584, 1152),
    "3.62": (3712, 1024),
    "3.75": (3840, 1024),
    "3.88": (3968, 1024),
    "4.0": (4096, 1024),
}

# diffusers' 512 table is the 1024 one halved and its 4096 table the 2048 one doubled,
# entry for entry and in the same order; deriving them keeps one source per table family.
ASPECT_RATIO_512_BIN: dict[str, tuple[int, int]] = {k: (h // 2, w // 2) for k, (h, w) in ASPECT_RATIO_1024_BIN.items()}
ASPECT_RATIO_4096_BIN: dict[str, tuple[int, int]] = {k: (h * 2, w * 2) for k, (h, w) in ASPECT_RATIO_2048_BIN.items()}

# DiT `config.sample_size` (latent side at the trained resolution) -> bin table.
BINS_BY_SAMPLE_SIZE: dict[int, dict[str, tuple[int, int]]] = {
    16: ASPECT_RATIO_512_BIN,
    32: ASPECT_RATIO_1024_BIN,
    64: ASPECT_RATIO_2048_BIN,
    128: ASPECT_RATIO_4096_BIN,
}


def aspect_ratio_bins(sample_size: int) -> dict[str, tuple[int, int]]:
    """The bin table for a DiT with `config.sample_size` 16, 32, 64 or 128 (512px ... 4K)."""
    try:
        return BINS_BY_SAMPLE_SIZE[int(sample_size)]
    except (KeyError, TypeError, ValueError):
        raise SanaInputError(
            f"no resolution bins for DiT sample_size {sample_size!r}; expected one of {sorted(BINS_BY_SAMPLE_SIZE)}"
        ) from None


def check_image_size(height: object, width: object, *, names: tuple[str, str] = ("height", "width")) -> tuple[int, int]:
    """(height, width) as ints when both are whole pixel counts in [1, MAX_IMAGE_SIDE]; else
    `SanaInputError` naming the argument (`names`), the value and the limit."""
    return (
        check_integer(names[0], height, low=1, high=MAX_IMAGE_SIDE),
        check_integer(names[1], width, low=1, high=MAX_IMAGE_SIDE),
    )


def nearest_multiple(value: int, multiple: int) -> int:
    """`value` rounded to the nearest positive multiple of `multiple` (at least `multiple`)."""
    return max(multiple, round(value / multiple) * multiple)


def closest_bin(height: int, width: int, bins: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(height, width) of the bin whose ratio key is nearest height/width; the first key in
    table order wins a tie."""
    if height <= 0 or width <= 0:
        raise SanaInputError(f"image size must be positive, got {height}x{width} (height x width)")
    ratio = height / width
    key = min(bins, key=lambda k: abs(float(k) - ratio))
    bin_height, bin_width = bins[key]
    return int(bin_height), int(bin_width)


def resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale [B, C, h, w] images to cover (height, width) and centre-crop to exactly that.

    The scale is max(height/h, width/w); the resized side lengths are truncated to ints;
    resampling is bilinear with align_corners=False (diffusers' and NVlabs'
    `resize_and_crop_tensor`). Images already at the size are returned unchanged.
    """
    source_height, source_width = images.shape[-2], images.shape[-1]
    if (source_height, source_width) == (height, width):
        return images
    scale = max(height / source_height, width / source_width)
    resized_height, resized_width = int(source_height * scale), int(source_width * scale)
    resized = F.interpolate(images, size=(resized_height, resized_width), mode="bilinear", align_corners=False)
    top = (resized_height - height) // 2
    left = (resized_width - width) // 2
    return resized[:, :, top : top + height, left : left + width]
