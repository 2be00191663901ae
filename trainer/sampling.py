"""Sampling from cached text embeddings (sample grids during training, evaluation).

Built from `sana.samplers` / `sana.schedules`: Flow-DPM-Solver with classifier-free guidance,
the unconditional branch fed the empty prompt's embedding (what caption dropout trained).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sana.samplers import draw_noise, flow_dpm_solver, guided_velocity
from sana.schedules import flow_dpm_schedule

from .data import pad_texts


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    texts: Sequence[torch.Tensor],
    null_text: torch.Tensor,
    latent_size: tuple[int, int],
    *,
    steps: int = 20,
    guidance_scale: float = 4.5,
    shift: float | None = None,
    seed: int = 0,
    latent_channels: int | None = None,
) -> torch.Tensor:
    """Latents [B, c, h, w] (float32, scaled like the training latents) for per-prompt `texts` ([L_i, D])."""
    config = model.config
    device, dtype = model.device, model.dtype
    batch = len(texts)
    cond, cond_mask = pad_texts([t.float() for t in texts])
    uncond, uncond_mask = pad_texts([null_text.float()] * batch)
    length = max(cond.shape[1], uncond.shape[1])
    cond, cond_mask = _pad_to(cond, cond_mask, length)
    uncond, uncond_mask = _pad_to(uncond, uncond_mask, length)
    generator = torch.Generator().manual_seed(seed)
    channels = latent_channels or config.in_channels
    noise = draw_noise((batch, channels, *latent_size), generator, device=device)
    schedule = flow_dpm_schedule(steps, shift if shift is not None else config.flow_shift)
    use_cfg = guidance_scale > 1.0

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if use_cfg:
            # `guidance_branches` order: the unconditional chunk first, then the conditional one.
            context = torch.cat([uncond, cond])
            mask = torch.cat([uncond_mask, cond_mask])
        else:
            context, mask = cond, cond_mask
        return model(x.to(dtype), t.to(device), context.to(device, dtype), mask.to(device))

    velocity = guided_velocity(call, guidance_scale=guidance_scale)
    was_training = model.training
    model.eval()
    try:
        return flow_dpm_solver(velocity, noise, schedule)
    finally:
        model.train(was_training)


def _pad_to(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - embeds.shape[1]
    if extra <= 0:
        return embeds, mask
    return torch.nn.functional.pad(embeds, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra))


@torch.no_grad()
def decode_latents(dcae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images [B, 3, H, W] in [-1, 1]."""
    return dcae.decode((latents / dcae.scaling_factor).to(dcae.device, dcae.dtype)).float().clamp(-1, 1)
