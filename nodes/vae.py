"""What DC-AE Decode / DC-AE Encode compute (no ComfyUI): the node's widgets as the DC-AE's
tiling arguments, around `sana.sampling.latents_to_images` / `images_to_latents`, with the
progress the DC-AE's tiler reports (`on_step(done, total)`, one step per network call).

ComfyUI's LATENT holds raw DC-AE latents (its latent format scales them for the model), so the
nodes decode and encode unscaled. NaN/inf latents or pixels raise `SanaNonFiniteError` rather
than decode to a black image.
"""

from __future__ import annotations

import torch

from ..sana.dcae_tiling import TileProgress
from ..sana.errors import SanaInputError, SanaNonFiniteError
from ..sana.sampling import images_to_latents, latents_to_images


def tile_arguments(tile_size: int, tile_overlap: int) -> tuple[int | None, int | None]:
    """The node's widgets as `DCAE.decode/encode` arguments: tile_size 0 means automatic (None),
    and the overlap is clamped to half the tile (ComfyUI's tiled nodes clamp it similarly)."""
    if tile_size <= 0:
        return None, tile_overlap if tile_overlap > 0 else None
    return tile_size, min(tile_overlap, (tile_size // 2) // 32 * 32)


def decode_latents(dcae, latents: torch.Tensor, tile_size: int = 0, tile_overlap: int = 256,
                   on_step: TileProgress | None = None) -> torch.Tensor:
    """ComfyUI LATENT samples (unscaled DC-AE latents) -> IMAGE [B, H, W, 3] in [0, 1] (float32, CPU).

    `on_step(done, total)` is called before the first decoder call (chunk or tile) and after
    each. NaN/inf latents or pixels raise `SanaNonFiniteError` (naming which)."""
    if not bool(torch.isfinite(latents).all()):
        raise SanaNonFiniteError("the latents to decode hold NaN/inf values: the node that made them (a sampler) went non-finite")
    tile, overlap = tile_arguments(tile_size, tile_overlap)
    with torch.no_grad():
        return latents_to_images(dcae, latents, scaled=False, tile_size=tile, tile_overlap=overlap, progress=on_step)


def crop_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crop IMAGE [B, H, W, C] to multiples of `multiple` (as ComfyUI's VAE Encode does)."""
    h, w = images.shape[1], images.shape[2]
    new_h, new_w = h // multiple * multiple, w // multiple * multiple
    if new_h == 0 or new_w == 0:
        raise SanaInputError(f"image {w}x{h} is smaller than one DC-AE latent ({multiple} px)")
    top, left = (h - new_h) // 2, (w - new_w) // 2
    return images[:, top : top + new_h, left : left + new_w]


def encode_images(dcae, images: torch.Tensor, tile_size: int = 0, tile_overlap: int = 256,
                  on_step: TileProgress | None = None) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in [0, 1] -> unscaled DC-AE latents (float32, CPU), centre-cropped to the
    compression; `on_step` as in `decode_latents`."""
    images = crop_to_multiple(images[..., :3], dcae.spatial_compression)
    tile, overlap = tile_arguments(tile_size, tile_overlap)
    with torch.no_grad():
        latents = images_to_latents(dcae, images, scaled=False, tile_size=tile, tile_overlap=overlap, progress=on_step)
    return latents.cpu()


__all__ = ["crop_to_multiple", "decode_latents", "encode_images", "tile_arguments"]
