"""Sample grids from cached text embeddings (training samples), through the sampling layer.

The schedule (`sana.sampling.flow_schedule`), the guidance branches and their text batch
(`guidance_branches`, `guided_context` inside `sana.pipeline.denoise_flow`) and the decoding
(`sana.sampling.latents_to_images`) are the ones `sana.generate` and the nodes use; only the
prompts differ: embeddings from the cache (or encoded at train time), the unconditional branch
fed the empty prompt's embedding (what caption dropout trained).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sana.pipeline import Control, PromptEmbeddings, denoise_flow
from sana.samplers import draw_noise, guidance_branches
from sana.sampling import FLOW_DPM_SOLVER, flow_schedule, latents_to_images

from .data import pad_texts
from .plotting import image_grid, to_uint8


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
    control: tuple[torch.nn.Module, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Latents [B, c, h, w] (float32, scaled like the training latents) for per-prompt `texts`
    ([L_i, D]), with Flow-DPM-Solver and classifier-free guidance as `sana.generate` samples;
    `control` = (a SanaControlNet, control latents [B, c, h, w]) steers every step at scale 1."""
    device, batch = model.device, len(texts)
    # One padding for both branches: the prompts' and the empty prompt's rows share a length.
    context, mask = pad_texts([t.float() for t in texts] + [null_text.float()] * batch)
    context, mask = context.to(device), mask.to(device)
    text = PromptEmbeddings(context[:batch], mask[:batch], context[batch:], mask[batch:])
    noise = draw_noise((batch, model.config.in_channels, *latent_size), torch.Generator().manual_seed(seed), device=device)
    schedule = flow_schedule(FLOW_DPM_SOLVER, steps, shift if shift is not None else model.config.flow_shift)
    steering = None
    modules = [model]
    if control is not None:
        controlnet, latents = control
        steering = Control(controlnet, latents.to(device, model.dtype), 1.0, range(steps))
        modules.append(controlnet)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        return denoise_flow(model, text, noise, schedule, solver=FLOW_DPM_SOLVER,
                            branches=guidance_branches(guidance_scale), guidance_scale=guidance_scale, control=steering)
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


def write_sample_grid(dcae, latents: torch.Tensor, prompts: Sequence[str], path: Path,
                      controls: torch.Tensor | None = None) -> np.ndarray:
    """Decode `latents` (`latents_to_images`) and save them as a labelled PNG grid; returns the
    grid as a uint8 [H, W, 3] array. With `controls` (the control latents they were steered by),
    each image follows its control image as the DC-AE decodes it."""
    images = to_uint8(latents_to_images(dcae, latents))
    labels = list(prompts)
    columns = None
    if controls is not None:
        shown = to_uint8(latents_to_images(dcae, controls.to(latents)))
        images = [image for pair in zip(shown, images) for image in pair]
        labels = [label for prompt in prompts for label in ("control", prompt)]
        columns = min(len(images), 4)
    grid = image_grid(images, labels, columns=columns, scale=max(1, 128 // images[0].shape[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return np.asarray(grid)
