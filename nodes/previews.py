"""Latent previews for the Sana MODEL (no ComfyUI): least-squares latent->RGB factors fitted on the
loaded DC-AE, kept in a registry that ComfyUI's Latent2RGB previewer reads through the SANA
latent format (`comfy_model.SanaLatentFormat`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..sana.sampling import images_to_latents

_PREVIEW_FACTORS: dict[int, tuple[list[list[float]], list[float]]] = {}


def register_preview_factors(latent_channels: int, factors: list[list[float]], bias: list[float]) -> None:
    """Remember latent->RGB preview factors for latents with `latent_channels` channels."""
    _PREVIEW_FACTORS[latent_channels] = (factors, bias)


def preview_factors(latent_channels: int) -> tuple[list[list[float]], list[float]]:
    """The registered preview factors ([C][3] and [3]), or a neutral grey fallback (every channel adds
    equally to R, G and B) until a DC-AE has been loaded."""
    if latent_channels in _PREVIEW_FACTORS:
        return _PREVIEW_FACTORS[latent_channels]
    weight = 0.5 / math.sqrt(latent_channels)
    return [[weight] * 3 for _ in range(latent_channels)], [0.0, 0.0, 0.0]


def preview_fit_images(compression: int, *, fields: int = 16, seed: int = 0) -> torch.Tensor:
    """Synthetic images [N, 3, 4f, 4f] in [0, 1] for the preview fit: the 8 corners of the RGB cube,
    mid grey, and smooth random colour fields (bilinear from 3x3 colours), so the fit sees both flat
    colours and gentle gradients, which is what early denoising steps look like."""
    size = 4 * compression
    corners = torch.tensor([[r, g, b] for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)] + [[0.5, 0.5, 0.5]])
    solid = corners[:, :, None, None].expand(-1, -1, size, size)
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(fields, 3, 3, 3, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    return torch.cat([solid, smooth]).contiguous()


@torch.no_grad()
def fit_latent_rgb_factors(dcae, images: torch.Tensor | None = None) -> tuple[list[list[float]], list[float]]:
    """Least-squares latent->RGB factors for ComfyUI's Latent2RGB previewer, fitted on this DC-AE.

    Encodes `images` ([N, 3, H, W] in [0, 1]; default `preview_fit_images`), scales the latents as
    the DiT sees them (times `scaling_factor`), and solves a ridge-regularised linear map
    [latent, 1] -> the mean [-1, 1] colour of each latent pixel's f x f patch. Returns
    (factors [C][3], bias [3]) as plain lists, the form `LatentFormat` stores.
    """
    f = dcae.spatial_compression
    if images is None:
        images = preview_fit_images(f)
    latents = images_to_latents(dcae, images.movedim(1, -1)).cpu()
    targets = F.avg_pool2d(images.float() * 2 - 1, f)
    features = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    colours = targets.permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([features, torch.ones(features.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = design.T @ design
    ridge = 1e-4 * gram.diagonal()[:-1].mean().clamp_min(1e-12)
    penalty = torch.diag(torch.cat([torch.full((features.shape[1],), float(ridge)), torch.zeros(1)])).double()
    solution = torch.linalg.solve(gram + penalty, design.T @ colours)
    return solution[:-1].float().tolist(), solution[-1].float().tolist()


def preview_rgb(latents: torch.Tensor, factors: list[list[float]], bias: list[float]) -> torch.Tensor:
    """[B, C, h, w] DiT-space latents -> [B, h, w, 3] preview colours in [-1, 1] space (what Latent2RGB computes)."""
    weight = torch.tensor(factors, dtype=torch.float32).T
    return F.linear(latents.float().movedim(1, -1), weight, torch.tensor(bias, dtype=torch.float32))


__all__ = ["fit_latent_rgb_factors", "preview_factors", "preview_fit_images", "preview_rgb", "register_preview_factors"]
