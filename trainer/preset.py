"""The embedded default model: `python -m trainer --preset shapes-tiny` builds it from code alone.

The preset builds, in `output_dir`, a model folder laid out like a diffusers SANA pipeline
(`text_encoder/` with its tokenizer, `vae/`, `transformer/`):

1. a tiny Gemma-2 text encoder folder with its own tokenizer (`tiny_models.build_text_encoder`);
2. a procedurally drawn shapes-world dataset (`shapes.write_dataset`, PNG + .txt captions);
3. a tiny f32 DC-AE trained on shapes-world images (`train_dcae`), checked by scoring its
   reconstructions of held-out scenes with the evaluator (`evaluate.reconstruction_adherence`);
4. the latent / text cache (`cache.build_cache`), then the DiT trained on it (`train_dit`);
5. `transformer/` = the EMA weights; `evaluation.json` = prompt adherence on held-out prompts.

Every stage skips itself when its output exists, so an interrupted preset run resumes; the
values it was built with are kept in `preset.json`, and a rerun with other values (`--set`) is
refused rather than silently keeping the old stages. `--set` values are checked, each against
the option it sets, before the first stage. Stages reused from an earlier run keep that run's
timings in `preset_summary.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sana.checkpoint import read_json_file, write_json
from sana.errors import SanaCheckpointError, SanaInputError

from . import shapes
from .cache import LatentCache, build_cache
from .data import read_records
from .dit_config import DiTTrainConfig
from .dit_config import check_values as check_dit_values
from .evaluate import evaluate_model, reconstruction_adherence
from .plotting import from_uint8
from .shapes_model import DEFAULT_DEMO_PROMPTS
from .tiny_models import build_text_encoder, tiny_dcae_config, tiny_dit_config
from .train_dcae import DCAETrainConfig, train_dcae
from .train_dcae import check_values as check_dcae_values
from .train_dit import train_dit

PRESETS_DIR = Path(__file__).parent / "presets"
PRESET_FILE = "preset.json"  # the values a model folder was built with
SUMMARY_FILE = "preset_summary.json"
STAGES = ("text_encoder", "dataset", "dcae", "cache", "dit")
TRAINING_SECTIONS = {"dcae_training": (DCAETrainConfig, check_dcae_values), "dit_training": (DiTTrainConfig, check_dit_values)}
EXTRA_KEYS = {"dit_training": {"sample_prompt_count"}}  # preset keys that are no trainer option
SUPPLIED = {"dit_training": {"vae": "vae"}}  # options the preset gives its trainers itself (the paths it builds)


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise SanaInputError(f"unknown preset {name!r} (known: {known})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SanaCheckpointError(f"preset file {path}: cannot be read as JSON: {error}") from None


def apply_overrides(name: str, preset: dict, overrides: dict) -> dict:
    """The preset with `overrides` ({"SECTION.KEY": value}) applied, each checked first: the
    section and key must exist (a training section: any option of its trainer) and the value
    must be what the key takes. Raises `SanaInputError` naming the `--set` item."""
    result = copy.deepcopy(preset)
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if not isinstance(result.get(section), dict) or not field:
            sections = sorted(k for k, v in result.items() if isinstance(v, dict))
            raise SanaInputError(f"--set {key}: the preset {name!r} has no section {section!r} (sections: {sections})")
        known = set(result[section]) | _training_options(section)
        if field not in known:
            raise SanaInputError(f"--set {key}: {section!r} has no key {field!r} (keys: {sorted(known)})")
        if field in preset[section] and not _same_kind(value, preset[section][field]):
            raise SanaInputError(f"--set {key}={json.dumps(value)}: expected a value like {json.dumps(preset[section][field])}")
        result[section][field] = value
    _check_training_sections(result)
    return result


def _training_options(section: str) -> set[str]:
    config, _ = TRAINING_SECTIONS.get(section, (None, None))
    return {f.name for f in dataclasses.fields(config)} if config else set()


def _same_kind(value, example) -> bool:
    if isinstance(example, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(example, bool)
    if isinstance(example, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(value, int) or not isinstance(example, int))
    if isinstance(example, list):
        return isinstance(value, list) and all(_same_kind(v, example[0]) for v in value) if example else isinstance(value, list)
    return isinstance(value, type(example))


def _check_training_sections(preset: dict) -> None:
    """Run each trainer's own value checks on its section now, not after the stages before it."""
    for section, (config_class, check) in TRAINING_SECTIONS.items():
        values = {**SUPPLIED.get(section, {}), **{k: v for k, v in preset[section].items() if k not in EXTRA_KEYS.get(section, ())}}
        try:
            check(config_class(**values))
        except SanaInputError as error:
            raise SanaInputError(f"--set {section}: {error}") from None


def _built_stages(out: Path) -> list[str]:
    """The stages whose output is already in `out`."""
    done = {
        "text_encoder": (out / "text_encoder" / "config.json").is_file(),
        "dataset": (out / "data" / "scenes.jsonl").is_file(),
        "dcae": (out / "vae" / "config.json").is_file(),
        "cache": (out / "cache" / "cache.json").is_file(),
        "dit": (out / "transformer" / "config.json").is_file(),
    }
    return [stage for stage in STAGES if done[stage]]


def _check_folder(out: Path, preset: dict, overrides: dict) -> None:
    """Refuse a folder built with other values: its finished stages would be kept as they are."""
    built = _built_stages(out)
    if not built:
        return
    recorded = out / PRESET_FILE
    if recorded.is_file():
        before = read_json_file(recorded, "preset record")
        if not isinstance(before, dict):
            raise SanaCheckpointError(f"{recorded}: not a preset record (a JSON object); build into another --output-dir")
        changes = [f"{section}.{key}: {before.get(section, {}).get(key)!r} → {value!r}"
                   for section, values in preset.items() if isinstance(values, dict)
                   for key, value in values.items() if before.get(section, {}).get(key) != value]
    else:  # a folder of an earlier version: only a plain rerun may continue it
        changes = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    if changes:
        raise SanaInputError(
            f"{out} already holds stages ({', '.join(built)}) built with other preset values ({'; '.join(changes)}); "
            "they would be kept and the new values ignored: give another --output-dir"
        )


def run_preset(name: str, output_dir: str | Path, *, progress: bool = True, overrides: dict | None = None,
               threads: int = 0) -> dict:
    """Build the whole model folder with `threads` CPU threads (0: `distributed.set_cpu_threads`'
    default); returns the timing and evaluation summary."""
    overrides = overrides or {}
    preset = apply_overrides(name, load_preset(name), overrides)
    out = Path(output_dir)
    _check_folder(out, preset, overrides)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PRESET_FILE, preset)
    reused = _built_stages(out)
    timings: dict[str, float] = {}
    side = preset["data"]["side"]

    started = time.time()
    if "text_encoder" not in reused:
        prompts = [shapes.caption(s, np.random.default_rng(i)) for i, s in enumerate(shapes.all_scenes() * 4)]
        build_text_encoder(out / "text_encoder", prompts, **preset["text_encoder"])
    timings["text_encoder"] = time.time() - started

    started = time.time()
    data = out / "data"
    if "dataset" not in reused:
        staging = out / "data.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shapes.write_dataset(staging, preset["data"]["count"], side=side, seed=preset["data"]["seed"])
        staging.rename(data)
    timings["dataset"] = time.time() - started

    started = time.time()
    if "dcae" not in reused:
        _train_dcae_stage(out, preset, side, progress, threads)
    timings["dcae"] = time.time() - started
    reconstruction = reconstruction_adherence(out / "vae", side)

    started = time.time()
    sample_prompts = list(DEFAULT_DEMO_PROMPTS[: preset["dit_training"].get("sample_prompt_count", 4)])
    # On the CPU in fp32 wherever it runs: the tiny encoders cost nothing and the cache stays the same.
    build_cache(read_records(data), out / "cache", vae=out / "vae", text_encoder=out / "text_encoder", resolution=side,
                sample_prompts=sample_prompts, device="cpu", dtype="float32", progress=progress, **preset["cache"])
    timings["cache"] = time.time() - started

    started = time.time()
    if "dit" not in reused:
        _train_dit_stage(out, preset, progress, threads)
    timings["dit"] = time.time() - started

    write_json(out / "model_index.json", {"_class_name": "SanaShapesTiny", "preset": name, "text_encoder": "text_encoder",
                                          "vae": "vae", "transformer": "transformer", "image_size": side})
    started = time.time()
    evaluation = evaluate_model(out, **preset.get("evaluation", {}), out_dir=out)
    timings["evaluation"] = time.time() - started
    timings = _keep_earlier_timings(out, timings, reused)
    summary = {"preset": name, "timings_s": timings, "reused_stages": reused,
               "total_s": round(sum(v for v in timings.values() if v is not None), 1),
               "dcae_reconstruction": reconstruction, "evaluation": evaluation}
    write_json(out / SUMMARY_FILE, summary)
    return summary


def _keep_earlier_timings(out: Path, timings: dict[str, float], reused: list[str]) -> dict[str, float | None]:
    """This run's timings, rounded, with each reused stage's time from the summary that built it."""
    earlier = {}
    if (out / SUMMARY_FILE).is_file():
        try:
            earlier = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8")).get("timings_s", {})
        except (OSError, ValueError, AttributeError):
            earlier = {}
    return {stage: (earlier.get(stage) if stage in reused else round(seconds, 1)) for stage, seconds in timings.items()}


def _train_dcae_stage(out: Path, preset: dict, side: int, progress: bool, threads: int) -> None:
    dcae_dir = out / "runs" / "dcae"
    dcae_dir.mkdir(parents=True, exist_ok=True)
    (dcae_dir / "architecture.json").write_text(tiny_dcae_config(**preset["dcae_architecture"]).to_json())
    train_scenes = shapes.training_scenes()

    def images(rng: np.random.Generator, n: int) -> torch.Tensor:
        return from_uint8([shapes.render(s, side, rng) for s in shapes.sample_scenes(n, rng, train_scenes)])

    result = train_dcae(
        DCAETrainConfig(output_dir=str(dcae_dir), config_json=str(dcae_dir / "architecture.json"), resolution=side,
                        progress=progress, threads=threads, **preset["dcae_training"]),
        images,
    )
    shutil.copytree(result["path"], out / "vae.partial", dirs_exist_ok=True)
    (out / "vae.partial").rename(out / "vae")


def _train_dit_stage(out: Path, preset: dict, progress: bool, threads: int) -> None:
    dit_dir = out / "runs" / "dit"
    cache = LatentCache(out / "cache")
    size = cache.latent_size(0)[0]
    arch = tiny_dit_config(cache.latent_channels, cache.text_dim, size, **preset["dit_architecture"])
    dit_dir.mkdir(parents=True, exist_ok=True)
    (dit_dir / "architecture.json").write_text(json.dumps(arch.to_dict()))
    training = {k: v for k, v in preset["dit_training"].items() if k != "sample_prompt_count"}
    train_dit(DiTTrainConfig(output_dir=str(dit_dir), cache_dir=str(out / "cache"), model=str(dit_dir / "architecture.json"),
                             vae=str(out / "vae"), progress=progress, threads=threads, **training))
    weights = dit_dir / ("transformer_ema" if (dit_dir / "transformer_ema").is_dir() else "transformer")
    shutil.copytree(weights, out / "transformer.partial", dirs_exist_ok=True)
    (out / "transformer.partial").rename(out / "transformer")

