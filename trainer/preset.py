"""The embedded default model: `python -m trainer --preset shapes-tiny`, then `demo` and `evaluate`.

The preset builds, in `output_dir`, a model folder laid out like a diffusers SANA pipeline
(`text_encoder/` with its tokenizer, `vae/`, `transformer/`) from nothing but code:

1. a tiny Gemma-2 text encoder folder with its own tokenizer (`tiny_models.build_text_encoder`);
2. a procedurally drawn shapes-world dataset (`shapes.write_dataset`, PNG + .txt captions);
3. a tiny DC-AE trained on shapes-world images (`train_dcae`);
4. the latent / text cache (`data.build_cache`), then the DiT trained on it (`train_dit`);
5. `transformer/` = the EMA weights; `evaluation.json` = prompt adherence on held-out prompts.

Every stage skips itself when its output exists, so an interrupted preset run resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sana.checkpoint import write_json

from . import shapes

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_DEMO_PROMPTS = (
    "a large red circle on the left",
    "a small blue square at the top",
    "a large yellow triangle on the right",
    "a large green square at the bottom",
    "a small purple circle in the center",
    "two cyan triangles",
    "three red squares",
    "a large blue triangle in the center",
)


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise SystemExit(f"unknown preset {name!r} (known: {known})")
    return json.loads(path.read_text())


def run_preset(name: str, output_dir: str | Path, *, progress: bool = True, overrides: dict | None = None) -> dict:
    """Build the whole model folder; returns the timing and evaluation summary."""
    from sana.text_encoder import load_text_encoder

    from .data import build_cache, read_records
    from .tiny_models import build_text_encoder, tiny_dcae_config, tiny_dit_config
    from .train_dcae import DCAETrainConfig, train_dcae
    from .train_dit import DiTTrainConfig, train_dit

    preset = load_preset(name)
    for key, value in (overrides or {}).items():
        section, _, field = key.partition(".")
        preset[section][field] = value
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    timings: dict[str, float] = {}
    side = preset["data"]["side"]

    started = time.time()
    if not (out / "text_encoder" / "config.json").is_file():
        prompts = [shapes.caption(s, np.random.default_rng(i)) for i, s in enumerate(shapes.all_scenes() * 4)]
        build_text_encoder(out / "text_encoder", prompts, **preset["text_encoder"])
    timings["text_encoder"] = time.time() - started

    started = time.time()
    data = out / "data"
    if not (data / "scenes.jsonl").is_file():
        staging = out / "data.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shapes.write_dataset(staging, preset["data"]["count"], side=side, seed=preset["data"]["seed"])
        staging.rename(data)
    timings["dataset"] = time.time() - started

    started = time.time()
    if not (out / "vae" / "config.json").is_file():
        dcae_dir = out / "runs" / "dcae"
        dcae_dir.mkdir(parents=True, exist_ok=True)
        (dcae_dir / "architecture.json").write_text(tiny_dcae_config(**preset["dcae_architecture"]).to_json())
        train_scenes = shapes.training_scenes()

        def images(rng: np.random.Generator, n: int) -> torch.Tensor:
            drawn = [shapes.render(s, side, rng) for s in shapes.sample_scenes(n, rng, train_scenes)]
            return torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2).float() / 127.5 - 1

        result = train_dcae(
            DCAETrainConfig(output_dir=str(dcae_dir), config_json=str(dcae_dir / "architecture.json"), resolution=side,
                            progress=progress, **preset["dcae_training"]),
            images,
        )
        shutil.copytree(result["path"], out / "vae.partial", dirs_exist_ok=True)
        (out / "vae.partial").rename(out / "vae")
    timings["dcae"] = time.time() - started

    started = time.time()
    from sana.dcae_io import load_dcae

    sample_prompts = list(DEFAULT_DEMO_PROMPTS[: preset["dit_training"].get("sample_prompt_count", 4)])
    build_cache(read_records(data), out / "cache", dcae=lambda: load_dcae(out / "vae", dtype=torch.float32),
                text_encoder=lambda: load_text_encoder(out / "text_encoder"), resolution=side,
                sample_prompts=sample_prompts, progress=progress, **preset["cache"])
    timings["cache"] = time.time() - started

    started = time.time()
    dit_dir = out / "runs" / "dit"
    if not (out / "transformer" / "config.json").is_file():
        from .data import LatentCache

        cache = LatentCache(out / "cache")
        size = cache.latent_size(0)[0]
        arch = tiny_dit_config(cache.latent_channels, cache.text_dim, size, **preset["dit_architecture"])
        dit_dir.mkdir(parents=True, exist_ok=True)
        (dit_dir / "architecture.json").write_text(json.dumps(arch.to_dict()))
        training = {k: v for k, v in preset["dit_training"].items() if k != "sample_prompt_count"}
        train_dit(DiTTrainConfig(output_dir=str(dit_dir), cache_dir=str(out / "cache"), model=str(dit_dir / "architecture.json"),
                                 vae=str(out / "vae"), progress=progress, **training))
        weights = dit_dir / ("transformer_ema" if (dit_dir / "transformer_ema").is_dir() else "transformer")
        shutil.copytree(weights, out / "transformer.partial", dirs_exist_ok=True)
        (out / "transformer.partial").rename(out / "transformer")
    timings["dit"] = time.time() - started

    started = time.time()
    evaluation = evaluate_model(out, **preset.get("evaluation", {}))
    timings["evaluation"] = time.time() - started
    summary = {"preset": name, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "total_s": round(sum(timings.values()), 1), "evaluation": evaluation}
    write_json(out / "preset_summary.json", summary)
    write_json(out / "model_index.json", {"_class_name": "SanaShapesTiny", "preset": name, "text_encoder": "text_encoder",
                                          "vae": "vae", "transformer": "transformer", "image_size": side})
    return summary


class TextToImage:
    """Prompts → images with a model folder (text_encoder/, vae/, transformer/), one model in memory at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        for part in ("text_encoder", "vae", "transformer"):
            if not (self.folder / part).is_dir():
                raise FileNotFoundError(f"{self.folder} has no {part}/ folder: not a model folder")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], *, seed: int = 0, steps: int = 20, guidance_scale: float = 4.5,
                 image_size: int | None = None) -> list[np.ndarray]:
        from sana.dcae_io import load_dcae
        from sana.dit_io import load_dit
        from sana.text_encoder import load_text_encoder

        from .plotting import to_uint8
        from .sampling import decode_latents, sample_latents

        encoder = load_text_encoder(self.folder / "text_encoder")
        embeds, mask = encoder.encode(["", *prompts])
        texts = [e[: max(1, int(m.sum()))].float() for e, m in zip(embeds, mask)]
        del encoder
        model = load_dit(self.folder / "transformer", dtype=torch.float32)
        index = json.loads((self.folder / "model_index.json").read_text()) if (self.folder / "model_index.json").is_file() else {}
        dcae = load_dcae(self.folder / "vae", dtype=torch.float32)
        side = image_size or index.get("image_size") or model.config.sample_size * dcae.spatial_compression
        latent = side // dcae.spatial_compression
        latents = sample_latents(model, texts[1:], texts[0], (latent, latent), steps=steps, guidance_scale=guidance_scale, seed=seed)
        del model
        return to_uint8(decode_latents(dcae, latents))


def evaluate_model(folder: str | Path, *, seeds: int = 2, steps: int = 20, guidance_scale: float = 4.5,
                   scenes: Sequence[shapes.Scene] | None = None, grid: bool = True) -> dict:
    """Prompt adherence on the held-out scenes (first caption template), `seeds` images each."""
    scenes = list(scenes) if scenes is not None else shapes.held_out_scenes()
    generate = TextToImage(folder)
    prompts = [shapes.caption(s) for s in scenes]
    images, targets = [], []
    for seed in range(seeds):
        images += generate(prompts, seed=seed, steps=steps, guidance_scale=guidance_scale)
        targets += scenes
    result = shapes.evaluate(images, targets).to_dict()
    result.update(prompts="held-out", seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    if grid:
        from .plotting import image_grid

        image_grid(images[: len(prompts)][:16], prompts[:16], columns=4, scale=2).save(Path(folder) / "evaluation_grid.png")
    write_json(Path(folder) / "evaluation.json", result)
    return result


def demo(folder: str | Path, prompts: Sequence[str], out_png: str | Path, *, seed: int = 0, steps: int = 20,
         guidance_scale: float = 4.5) -> Path:
    """Write a PNG grid of `prompts` (each image labelled with its prompt)."""
    from .plotting import image_grid

    images = TextToImage(folder)(list(prompts), seed=seed, steps=steps, guidance_scale=guidance_scale)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, list(prompts), columns=4, scale=max(1, 128 // images[0].shape[0])).save(out_png)
    return out_png
