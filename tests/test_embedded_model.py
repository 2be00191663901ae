"""The embedded default model shipped in assets/shapes-tiny: it loads with the library's own
loaders, fits together, and `python -m trainer demo` turns held-out prompts into a labelled grid.

The adherence check uses the deterministic evaluator on the held-out prompts with fixed seeds
(CPU, fixed noise), so it is reproducible; the full figures are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sana import load_dit, load_text_encoder
from sana.dcae_io import load_dcae
from sana.pipeline import check_components
from trainer import shapes
from trainer.evaluate import evaluate_model
from trainer.preset import load_preset
from trainer.shapes_model import SHIPPED_MODEL_DIR, ShapesModel, demo

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "transformer").is_dir(), reason="shipped model absent")

# The targets for prompt adherence on held-out prompts.
TARGETS = {"colour": 0.9, "shape": 0.8, "position": 0.8}


def test_shipped_model_loads_with_the_library_loaders():
    dit = load_dit(SHIPPED_MODEL_DIR / "transformer", dtype=torch.float32)
    dcae = load_dcae(SHIPPED_MODEL_DIR / "vae", dtype=torch.float32)
    encoder = load_text_encoder(SHIPPED_MODEL_DIR / "text_encoder")
    check_components(dit, dcae, encoder)
    index = json.loads((SHIPPED_MODEL_DIR / "model_index.json").read_text())
    preset = load_preset(index["preset"])
    # What the preset promises: an f32 DC-AE, images of the preset's side.
    assert dcae.spatial_compression == 32
    assert index["image_size"] == preset["data"]["side"] == dit.config.sample_size * dcae.spatial_compression
    total = sum(p.stat().st_size for p in SHIPPED_MODEL_DIR.rglob("*") if p.is_file())
    assert total < 16 * 2**20, total  # small enough to live in the repository


def test_demo_writes_a_labelled_grid_for_a_held_out_prompt(tmp_path):
    from PIL import Image

    prompts = [shapes.caption(s) for s in shapes.held_out_scenes()[:2]]
    path = demo(SHIPPED_MODEL_DIR, prompts, tmp_path / "grid.png", steps=4)
    grid = Image.open(path)
    side = json.loads((SHIPPED_MODEL_DIR / "model_index.json").read_text())["image_size"]
    assert grid.width >= 2 * side and grid.height > side  # two cells, a label under each image
    images = ShapesModel.load(SHIPPED_MODEL_DIR)(prompts, steps=4)
    assert len(images) == 2 and images[0].shape == (side, side, 3) and images[0].dtype == np.uint8


def test_shipped_model_meets_the_adherence_targets_on_held_out_prompts():
    result = evaluate_model(SHIPPED_MODEL_DIR, seeds=1)
    assert result["images"] == len(shapes.held_out_scenes())
    for attribute, target in TARGETS.items():
        assert result[attribute] >= target, (attribute, result)
