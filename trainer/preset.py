"""The embedded default model: `python -m trainer --preset shapes-tiny`, then `demo` and `evaluate`.

The preset builds, in `output_dir`, a model folder laid out like a diffusers SANA pipeline
(`text_encoder/` with its tokenizer, `vae/`, `transformer/`) from nothing but code:

1. a tiny Gemma-2 text encoder folder with its own tokenizer (`tiny_models.build_text_encoder`);
2. a procedurally drawn shapes-world dataset (`shapes.write_dataset`, PNG + .txt captions);
3. a tiny f32 DC-AE trained on shapes-world images (`train_dcae`), checked by scoring its
   reconstructions of held-out scenes with the evaluator (`reconstruction_adherence`);
4. the latent / text cache (`data.build_cache`), then the DiT trained on it (`train_dit`);
5. `transformer/` = the EMA weights; `evaluation.json` = prompt adherence on held-out prompts.

Every stage skips itself when its output exists, so an interrupted preset run resumes.
`pack_model` copies a built folder compactly (fp16 DiT and DC-AE); the copy in
`assets/shapes-tiny` (`SHIPPED_MODEL_DIR`) is what `python -m trainer demo` uses by default.
Text to image is `sana.generate` itself (`ShapesModel`), as in the nodes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sana.checkpoint import write_json
from sana.errors import SanaCheckpointError, SanaInputError

from . import shapes

PRESETS_DIR = Path(__file__).parent / "presets"
# The embedded default model: built by the shapes-tiny preset, packed (`pack_model`) and shipped
# with the repository, so that `python -m trainer demo` needs no training.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes-tiny"
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
        raise SanaInputError(f"unknown preset {name!r} (known: {known})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SanaCheckpointError(f"preset file {path}: cannot be read as JSON: {error}") from None


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
        if not isinstance(preset.get(section), dict) or not field:
            sections = sorted(k for k, v in preset.items() if isinstance(v, dict))
            raise SanaInputError(f"--set {key}: the preset {name!r} has no section {section!r} (sections: {sections})")
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
    reconstruction = reconstruction_adherence(out / "vae", side)

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

    write_json(out / "model_index.json", {"_class_name": "SanaShapesTiny", "preset": name, "text_encoder": "text_encoder",
                                          "vae": "vae", "transformer": "transformer", "image_size": side})
    started = time.time()
    evaluation = evaluate_model(out, **preset.get("evaluation", {}), out_dir=out)
    timings["evaluation"] = time.time() - started
    summary = {"preset": name, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "total_s": round(sum(timings.values()), 1), "dcae_reconstruction": reconstruction, "evaluation": evaluation}
    write_json(out / "preset_summary.json", summary)
    return summary


@dataclass
class ShapesModel:
    """A model folder's three parts, loaded once, and the image side it was trained at."""

    dit: torch.nn.Module
    dcae: torch.nn.Module
    text_encoder: object
    side: int

    @classmethod
    def load(cls, folder: str | Path) -> "ShapesModel":
        from sana.dcae_io import load_dcae
        from sana.dit_io import load_dit
        from sana.text_encoder import load_text_encoder

        folder = Path(folder)
        for part in ("text_encoder", "vae", "transformer"):
            if not (folder / part).is_dir():
                raise SanaCheckpointError(f"{folder} has no {part}/ folder: not a model folder")
        dit = load_dit(folder / "transformer", dtype=torch.float32)
        dcae = load_dcae(folder / "vae", dtype=torch.float32)
        index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
        side = index.get("image_size") or dit.config.sample_size * dcae.spatial_compression
        return cls(dit, dcae, load_text_encoder(folder / "text_encoder", dtype=torch.float32), int(side))

    def __call__(self, prompts: Sequence[str], *, seed: int = 0, steps: int = 20, guidance_scale: float = 4.5) -> list[np.ndarray]:
        """uint8 [side, side, 3] images, one per prompt, with `sana.generate` (the library's text-to-image)."""
        from sana.pipeline import generate

        # The shapes world's size (e.g. 128 px) is outside SANA's aspect-ratio bins, hence no binning.
        images = generate(dit=self.dit, dcae=self.dcae, text_encoder=self.text_encoder, prompt=list(prompts),
                          height=self.side, width=self.side, steps=steps, guidance_scale=guidance_scale, seed=seed,
                          resolution_binning=False)
        return list((images * 255).round().byte().numpy())


def reconstruction_adherence(vae: str | Path, side: int, *, seed: int = 0) -> dict:
    """The evaluator's scores on DC-AE reconstructions of the held-out scenes (one jittered
    render each): what the DiT can reach at best, since it generates in this latent space."""
    from sana.dcae_io import load_dcae

    dcae = load_dcae(vae, dtype=torch.float32)
    scenes = shapes.held_out_scenes()
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(np.stack([shapes.render(s, side, rng) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        decoded = dcae.decode(dcae.encode(pixels)).clamp(-1, 1)
    images = list(((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return shapes.evaluate(images, scenes).to_dict()


def evaluate_model(folder: str | Path, *, seeds: int = 2, steps: int = 20, guidance_scale: float = 4.5,
                   scenes: Sequence[shapes.Scene] | None = None, out_dir: str | Path | None = None) -> dict:
    """Prompt adherence on the held-out scenes (first caption template), `seeds` images each
    (seeds 0 .. seeds−1, one batch per seed). With `out_dir`, also writes `evaluation.json` and
    `evaluation_grid.png` (the first seed's images, labelled) there."""
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
        from .plotting import image_grid

        out_dir = Path(out_dir)
        image_grid(images[: len(prompts)], prompts, columns=6, scale=max(1, 128 // model.side)).save(out_dir / "evaluation_grid.png")
        write_json(out_dir / "evaluation.json", result)
    return result


def demo(folder: str | Path, prompts: Sequence[str], out_png: str | Path, *, seed: int = 0, steps: int = 20,
         guidance_scale: float = 4.5) -> Path:
    """Write a PNG grid of `prompts` (each image labelled with its prompt)."""
    from .plotting import image_grid

    images = ShapesModel.load(folder)(list(prompts), seed=seed, steps=steps, guidance_scale=guidance_scale)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, list(prompts), columns=4, scale=max(1, 128 // images[0].shape[0])).save(out_png)
    return out_png


def pack_model(folder: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Copy a model folder's parts to `out` for shipping: the DiT and DC-AE weights cast to
    `dtype` (halving them; loaders cast back with `dtype=`), the text encoder folder and the
    small JSON files as they are. Written next to `out` first, then renamed into place."""
    from sana.dcae_io import load_dcae, save_dcae
    from sana.dit_io import load_dit, save_dit

    folder, out = Path(folder), Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copytree(folder / "text_encoder", staging / "text_encoder")
    save_dcae(load_dcae(folder / "vae", dtype=torch.float32), staging / "vae", dtype=dtype)
    save_dit(load_dit(folder / "transformer", dtype=torch.float32).to(dtype), staging / "transformer")
    for name in ("model_index.json", "preset_summary.json"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, staging / name)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
