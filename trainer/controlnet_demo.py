"""`python -m trainer controlnet-demo`: a ControlNet for the shipped shapes-tiny model, trained on
the CPU in minutes, and what it does on scenes it never saw.

1. data: shapes-world training scenes (`shapes.write_dataset`) with their edge maps
   (`shapes.edge_map`, in `control/`) and captions that say nothing of position
   (`shapes.caption_without_position`): where the objects are is in the edge map only, so the
   ControlNet has to learn to read it;
2. the cache (`cache.build_cache`, control latents through the model's DC-AE);
3. `train_controlnet` from the shipped DiT (frozen);
4. evaluation on the held-out scenes (`shapes.held_out_scenes`, never drawn for training), each
   rendered with jitter per seed: the position-free prompt generated with `sana.generate`
   without control, and with the scene's edge map through the trained ControlNet (EMA weights),
   from the same noise; both scored by the shapes evaluator (`shapes.evaluate`: position over
   single-object scenes, colour and shape for reference).

Writes `controlnet_demo.json` (the scores and settings) and `controlnet_demo.png` (edge map,
without, with control for the first seed) in the output folder; every stage reuses what an
earlier run of the same options left there, and other options are refused.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sana.checkpoint import read_json_file, write_json
from sana.errors import SanaCheckpointError, SanaInputError

from . import shapes
from .options import output_folder
from .plotting import image_grid
from .shapes_model import SHIPPED_MODEL_DIR, ShapesModel

OPTIONS_FILE = "controlnet_demo_options.json"
RESULT_FILE = "controlnet_demo.json"
GRID_FILE = "controlnet_demo.png"
GRID_SCENES = 10  # scenes shown in the grid


@dataclass(frozen=True)
class DemoOptions:
    """What the demo trains and evaluates (its defaults take a few minutes on two CPU cores)."""

    model: str = str(SHIPPED_MODEL_DIR)
    count: int = 2000  # training images
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    controlnet_blocks: int = 2
    ema_decay: float = 0.99
    seed: int = 0
    seeds: int = 2  # evaluation images per held-out scene
    sample_steps: int = 20
    guidance_scale: float = 4.5

    def check(self) -> None:
        for name in ("count", "steps", "batch_size", "seeds", "sample_steps", "controlnet_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SanaInputError(f"--{name.replace('_', '-')} {value!r}: must be an integer ≥ 1")
        if not self.lr > 0:
            raise SanaInputError(f"--lr {self.lr!r}: must be > 0")
        for part in ("transformer", "vae", "text_encoder"):
            if not (Path(self.model) / part).is_dir():
                raise SanaInputError(f"--model {self.model}: not a model folder (no {part}/ in it)")


def run_controlnet_demo(out_dir: str | Path, options: DemoOptions = DemoOptions(), *, progress: bool = True,
                        threads: int = 0) -> dict:
    """Train and evaluate (see the module docstring); returns what `controlnet_demo.json` holds."""
    from .cache import build_cache
    from .controlnet_config import ControlNetTrainConfig
    from .data import read_records
    from .train_controlnet import train_controlnet

    options.check()
    out = output_folder(out_dir, "--out-dir")
    _claim_folder(out, options)
    timings = {}
    started = time.time()
    side = ShapesModel.load(options.model).side
    data, control = out / "data", out / "control"
    if not (data / "scenes.jsonl").is_file():
        for partial in (out / "data.partial", out / "control.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        shapes.write_dataset(out / "data.partial", options.count, side=side, seed=options.seed,
                             control_dir=out / "control.partial", describe=shapes.caption_without_position)
        (out / "control.partial").rename(control)
        (out / "data.partial").rename(data)
    timings["dataset"] = time.time() - started

    started = time.time()
    model = Path(options.model)
    build_cache(read_records(data, control_dir=control), out / "cache", vae=model / "vae", text_encoder=model / "text_encoder",
                resolution=side, device="cpu", dtype="float32", min_psnr=0, progress=progress, shard_size=1000, batch_size=64)
    timings["cache"] = time.time() - started

    started = time.time()
    run = out / "run"
    summary = train_controlnet(ControlNetTrainConfig(
        output_dir=str(run), cache_dir=str(out / "cache"), init=str(model / "transformer"), vae=str(model / "vae"),
        steps=options.steps, batch_size=options.batch_size, lr=options.lr, controlnet_blocks=options.controlnet_blocks,
        ema_decay=options.ema_decay, seed=options.seed, warmup_steps=min(50, options.steps // 10),
        save_every=max(options.steps // 2, 1), sample_every=max(options.steps // 2, 1), log_every=10, progress=progress,
        threads=threads, report_to="none"))
    timings["training"] = time.time() - started

    started = time.time()
    weights = run / ("controlnet_ema.safetensors" if options.ema_decay > 0 else "controlnet.safetensors")
    result = evaluate_control(options.model, weights, seeds=options.seeds, steps=options.sample_steps,
                              guidance_scale=options.guidance_scale, grid=out / GRID_FILE)
    timings["evaluation"] = time.time() - started
    result.update(options=asdict(options), controlnet=str(weights), final_loss=summary["loss"],
                  timings_s={k: round(v, 1) for k, v in timings.items()})
    write_json(out / RESULT_FILE, result)
    return result


def _claim_folder(out: Path, options: DemoOptions) -> None:
    """Record the options in `out`, refusing a folder an earlier run filled with other options."""
    recorded = out / OPTIONS_FILE
    if recorded.is_file():
        before = read_json_file(recorded, "demo options record")
        if not isinstance(before, dict):
            raise SanaCheckpointError(f"{recorded}: not a demo options record (a JSON object); give another --out-dir")
        changes = [f"--{k.replace('_', '-')} {before.get(k)!r} → {v!r}" for k, v in asdict(options).items() if before.get(k) != v]
        if changes:
            raise SanaInputError(f"{out} holds a demo run with other options ({'; '.join(changes)}): give another --out-dir")
    elif any(out.iterdir()):
        raise SanaInputError(f"--out-dir {out}: not empty and not a controlnet-demo folder; give a new or empty folder")
    write_json(recorded, asdict(options))


@torch.no_grad()
def evaluate_control(model_dir: str | Path, controlnet_file: str | Path, *, seeds: int = 2, steps: int = 20,
                     guidance_scale: float = 4.5, grid: str | Path | None = None) -> dict:
    """The shapes evaluator's scores on the held-out scenes, prompted without position, generated
    without and with each scene's edge map (seeds 0 .. seeds−1; the scene's render, and so its
    edge map, jittered per seed; the same noise for both)."""
    from sana import load_controlnet

    model = ShapesModel.load(model_dir)
    controlnet = load_controlnet(controlnet_file, dtype=torch.float32)
    scenes = shapes.held_out_scenes()
    prompts = [shapes.caption_without_position(s) for s in scenes]
    without, with_control, targets, edges = [], [], [], []
    for seed in range(seeds):
        rng = np.random.default_rng(10_000 + seed)
        maps = [shapes.edge_map(shapes.render(s, model.side, rng)) for s in scenes]
        control = torch.from_numpy(np.stack(maps)).float() / 255  # [B, H, W, 3] in [0, 1], as generate takes it
        without += model(prompts, seed=seed, steps=steps, guidance_scale=guidance_scale)
        with_control += model(prompts, seed=seed, steps=steps, guidance_scale=guidance_scale, controlnet=controlnet,
                              control_image=control)
        targets += scenes
        edges += maps
    result = {
        "without_control": shapes.evaluate(without, targets).to_dict(),
        "with_control": shapes.evaluate(with_control, targets).to_dict(),
        "held_out_scenes": len(scenes), "single_object_scenes": sum(s.count == 1 for s in scenes), "seeds": seeds,
        "steps": steps, "guidance_scale": guidance_scale, "prompts": "held-out scenes, no position words",
    }
    if grid is not None:
        shown = range(min(GRID_SCENES, len(scenes)))
        images = [image for i in shown for image in (edges[i], without[i], with_control[i])]
        labels = [label for i in shown for label in (f"edges: {scenes[i].position or 'scattered'}", prompts[i], "with control")]
        image_grid(images, labels, columns=6, scale=max(1, 128 // model.side)).save(grid)
    return result
