"""The trainer on a CUDA machine: cache, then one LoRA epoch of a random-weight Sana-1.6B at 1024px in
bf16; peak memory and images/s next to the memory model's prediction (issue 18's GPU check).

    python bench/train_gpu.py                          # CUDA: Sana-1.6B, DC-AE f32c32, Gemma-2-2B sizes (random weights)
    python bench/train_gpu.py --batch-size 4 --grad-checkpointing
    python bench/train_gpu.py --dry-run                # the same flow on the CPU with tiny models (checks the script)

Everything is made here, nothing is downloaded: noise images with shapes-world captions, a random
DiT (`sana-1600m-1024`), a random DC-AE (`dc-ae-f32c32-sana-1.1`) and a random Gemma-2 of
Gemma-2-2B's sizes with a small tokenizer, saved in their released layouts and read back by the
commands' own loaders. Speed and memory do not depend on the weights' values. The line printed last
is the row for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import gib  # noqa: E402
from trainer import shapes  # noqa: E402
from trainer.memory_plan import TrainingOptions, plan_training_memory  # noqa: E402

GEMMA_2_2B_SIZES = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256)


def write_images(folder: Path, count: int, side: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, scene in enumerate(shapes.sample_scenes(count, rng)):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png", compress_level=1)
        (folder / f"{i:05d}.txt").write_text(shapes.caption(scene, rng) + "\n")


def build_models(work: Path, dry_run: bool) -> tuple[Path, Path, Path, object]:
    """(DiT folder, DC-AE folder, text encoder folder, the DiT config) with random weights."""
    from sana.dcae import DCAE, DCAE_PRESETS
    from sana.dcae_io import save_dcae
    from sana.dit import DIT_PRESETS, SanaDiT
    from sana.dit_io import save_dit
    from sana.memory_plan import DCAE_PRESET
    from trainer.tiny_models import build_text_encoder, tiny_dcae_config, tiny_dit_config

    prompts = [shapes.caption(s) for s in shapes.all_scenes()]
    torch.manual_seed(0)
    if dry_run:
        dit_config = tiny_dit_config(32, 64, 2, hidden_size=64, depth=2)
        dcae, text_sizes = DCAE(tiny_dcae_config()), dict(hidden_size=64, intermediate_size=128, head_dim=32)
    else:
        dit_config, dcae, text_sizes = DIT_PRESETS["sana-1600m-1024"], DCAE(DCAE_PRESETS[DCAE_PRESET]), GEMMA_2_2B_SIZES
    if not (work / "dit" / "config.json").is_file():
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            save_dit(SanaDiT(dit_config).to(torch.bfloat16), work / "dit")
    if not (work / "vae" / "config.json").is_file():
        save_dcae(dcae, work / "vae", dtype=torch.bfloat16)
    if not (work / "text_encoder" / "config.json").is_file():
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # a 2.6B-parameter Gemma in bf16: half the memory and disk
        try:
            build_text_encoder(work / "text_encoder", prompts, **text_sizes)
        finally:
            torch.set_default_dtype(default)
    return work / "dit", work / "vae", work / "text_encoder", dit_config


def measured(fn):
    """(fn's result, seconds, peak allocated bytes, peak reserved bytes) on CUDA; no peaks on the CPU."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peaks = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (0, 0)
    return result, seconds, *peaks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/sana-train-bench", help="where the images, models, cache and run go")
    p.add_argument("--images", type=int, default=64, help="training images (one epoch = images / batch steps)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("train_gpu.py: no CUDA device (use --dry-run to check the script on the CPU)")

    from trainer.cache import build_cache
    from trainer.data import read_records
    from trainer.dit_config import DiTTrainConfig
    from trainer.train_dit import train_dit

    work = Path(args.workdir)
    resolution = 64 if args.dry_run else 1024
    device = "cpu" if args.dry_run else "cuda"
    write_images(work / "data", args.images, resolution)
    dit, vae, text_encoder, dit_config = build_models(work, args.dry_run)
    print(f"models and {args.images} images at {resolution}² in {work}", flush=True)

    cache_summary, cache_s, cache_peak, _ = measured(lambda: build_cache(
        read_records(work / "data"), work / "cache", vae=vae, text_encoder=text_encoder, resolution=resolution,
        batch_size=16, device=device, dtype="bfloat16", min_psnr=0, progress=False))
    print(f"cache: {cache_summary['samples']} images in {cache_s:.1f} s ({cache_summary['samples'] / cache_s:.2f} images/s), "
          f"peak allocated {gib(cache_peak)}", flush=True)

    steps = max(1, args.images // args.batch_size)
    config = DiTTrainConfig(output_dir=str(work / f"run_b{args.batch_size}"), cache_dir=str(work / "cache"), init=str(dit),
                            lora_rank=args.lora_rank, weights_dtype="bf16", grad_checkpointing=args.grad_checkpointing,
                            batch_size=args.batch_size, steps=steps, save_every=0, log_every=max(1, steps // 4),
                            report_to="none", device=device, resume=False, progress=False)
    summary, train_s, train_peak, train_reserved = measured(lambda: train_dit(config))
    images_per_s = steps * args.batch_size / train_s
    options = TrainingOptions(lora_rank=args.lora_rank, weights_dtype="bf16", grad_checkpointing=args.grad_checkpointing)
    plan = plan_training_memory(dit_config if args.dry_run else "sana-1600m-1024", resolution, args.batch_size, options)
    print(f"train: {steps} steps of {args.batch_size} in {train_s:.1f} s ({images_per_s:.2f} images/s, includes loading "
          f"the DiT), final loss {summary['loss']:.4f}")
    print(f"peak allocated {gib(train_peak)}, reserved {gib(train_reserved)}; modelled {gib(plan.peak)} ({options.flags()})")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    print(json.dumps({"device": device_name, "batch": args.batch_size, "options": options.flags(), "cache_images_per_s":
                      round(cache_summary["samples"] / cache_s, 2), "train_images_per_s": round(images_per_s, 2),
                      "peak_allocated_gib": round(train_peak / 2**30, 2), "peak_reserved_gib": round(train_reserved / 2**30, 2),
                      "modelled_gib": round(plan.peak / 2**30, 2)}))


if __name__ == "__main__":
    main()
