"""The shapes world: the evaluator reads back what the generator drew."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    all_scenes,
    analyze,
    caption,
    evaluate,
    held_out_scenes,
    is_held_out,
    parse_prompt,
    render,
    training_scenes,
    write_dataset,
)


def _blur(image: np.ndarray, seed: int) -> np.ndarray:
    """A decoder-like degradation: 5×5 box blur plus noise."""
    t = torch.tensor(image).permute(2, 0, 1)[None].float()
    t = F.avg_pool2d(t, 5, 1, 2, count_include_pad=False)
    t = t + torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * 8
    return t[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()


@pytest.mark.parametrize("side", [64, 128])
def test_analysis_recovers_every_scene(side):
    rng = np.random.default_rng(side)
    scenes = all_scenes()
    images = [render(s, side, rng) for s in scenes]
    result = evaluate(images, scenes)
    assert (result.colour, result.shape, result.position, result.count) == (1.0, 1.0, 1.0, 1.0)
    assert result.images == len(scenes) and result.single_object_images == sum(s.count == 1 for s in scenes)


def test_analysis_tolerates_blur_and_noise():
    rng = np.random.default_rng(7)
    scenes = all_scenes()
    result = evaluate([_blur(render(s, 128, rng), i) for i, s in enumerate(scenes)], scenes)
    assert min(result.colour, result.shape, result.position, result.count) >= 0.97


def test_evaluator_detects_wrong_images():
    """Images of a different colour, shape, place or count score 0 on that attribute."""
    scene = Scene("red", "circle", 1, "large", "left")
    wrong = {
        "colour": Scene("blue", "circle", 1, "large", "left"),
        "shape": Scene("red", "triangle", 1, "large", "left"),
        "position": Scene("red", "circle", 1, "large", "right"),
    }
    for attribute, other in wrong.items():
        result = evaluate([render(other, 96)], [scene])
        assert getattr(result, attribute) == 0.0, attribute
    result = evaluate([render(Scene("red", "circle", 3, None, None), 96)], [Scene("red", "circle", 2, None, None)])
    assert result.count == 0.0 and result.colour == 1.0
    blank = np.zeros((64, 64, 3), np.uint8) + np.array([24, 24, 28], np.uint8)
    assert analyze(blank).count == 0 and evaluate([blank], [scene]).colour == 0.0


def test_captions_parse_back_to_their_scene():
    rng = np.random.default_rng(0)
    for scene in all_scenes():
        for _ in range(4):
            text = caption(scene, rng)
            assert parse_prompt(text) == scene, text
    with pytest.raises(ValueError):
        parse_prompt("a photo of a cat")


def test_held_out_split_keeps_every_attribute_in_training():
    held, train = held_out_scenes(), training_scenes()
    assert 0.1 < len(held) / len(all_scenes()) < 0.25 and not set(held) & set(train)
    for colour in COLOURS:
        for shape in SHAPES:
            assert any(s.colour == colour and s.shape == shape for s in train)
        for position in POSITIONS:
            assert any(s.colour == colour and s.position == position for s in train)
    for shape in SHAPES:
        for position in POSITIONS:
            assert any(s.shape == shape and s.position == position for s in train)
    assert all(is_held_out(s) for s in held)


def test_write_dataset_is_deterministic_and_matches_its_manifest(tmp_path):
    from PIL import Image

    a, b = write_dataset(tmp_path / "a", 12, side=64, seed=3), write_dataset(tmp_path / "b", 12, side=64, seed=3)
    rows = [json.loads(line) for line in (a / "scenes.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        image = np.asarray(Image.open(a / row["file"]).convert("RGB"))
        assert np.array_equal(image, np.asarray(Image.open(b / row["file"]).convert("RGB")))
        scene = Scene(**row["scene"])
        assert not is_held_out(scene)
        assert (a / row["file"]).with_suffix(".txt").read_text().strip() == row["caption"]
        found = analyze(image)
        assert (found.colour, found.count) == (scene.colour, scene.count)
