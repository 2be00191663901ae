"""Shapes-world prompt adherence of a model folder (`python -m trainer evaluate`), and the
ceiling its DC-AE sets (`reconstruction_adherence`): the evaluator of `trainer.shapes` applied to
generated, or reconstructed, images of the held-out scenes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sana.checkpoint import write_json
from sana.sampling import latents_to_images

from . import shapes
from .options import output_folder
from .plotting import from_uint8, image_grid, to_uint8
from .shapes_model import ShapesModel


def reconstruction_adherence(vae: str | Path, side: int, *, seed: int = 0) -> dict:
    """The evaluator's scores on DC-AE reconstructions of the held-out scenes (one jittered
    render each): what the DiT can reach at best, since it generates in this latent space."""
    from sana.dcae_io import load_dcae

    dcae = load_dcae(vae, dtype=torch.float32)
    scenes = shapes.held_out_scenes()
    rng = np.random.default_rng(seed)
    pixels = from_uint8([shapes.render(s, side, rng) for s in scenes])
    with torch.no_grad():
        images = to_uint8(latents_to_images(dcae, dcae.encode(pixels), scaled=False))
    return shapes.evaluate(images, scenes).to_dict()


def evaluate_model(folder: str | Path, *, seeds: int = 2, steps: int = 20, guidance_scale: float = 4.5,
                   scenes: Sequence[shapes.Scene] | None = None, out_dir: str | Path | None = None) -> dict:
    """Prompt adherence on the held-out scenes (first caption template), `seeds` images each
    (seeds 0 .. seeds−1, one batch per seed). With `out_dir` (made first, so a folder that
    cannot be made fails before the work), also writes `evaluation.json` and
    `evaluation_grid.png` (the first seed's images, labelled) there."""
    if out_dir is not None:
        out_dir = output_folder(out_dir, "--out-dir")
    scenes = list(scenes) if scenes is not None else shapes.held_out_scenes()
    model = ShapesModel.load(folder)
    prompts = [shapes.caption(s) for s in scenes]
    images, targets = [], []
    for seed in range(seeds):
        images += model(prompts, seed=seed, steps=steps, guidance_scale=guidance_scale)
        targets += scenes
    result = shapes.evaluate(images, targets).to_dict()
    result.update(prompts="held-out", seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    if out_dir is not None:
        image_grid(images[: len(prompts)], prompts, columns=6, scale=max(1, 128 // model.side)).save(out_dir / "evaluation_grid.png")
        write_json(out_dir / "evaluation.json", result)
    return result
