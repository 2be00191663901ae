"""`python -m trainer <command> [options]`; `python -m trainer <command> --help` lists every option.

Commands:
  cache     encode an image folder / JSONL manifest into the latent + text-embedding cache
  dit       train the DiT (full fine-tune, or LoRA with --lora-rank) on a cache; torchrun-ready
  controlnet  train a ControlNet for a frozen DiT on a cache with control images; torchrun-ready
  controlnet-demo  train a ControlNet for the shipped model on shapes-world edge maps, on the CPU,
            and score generation with vs without control on held-out scenes
  dcae      train a small DC-AE (reconstruction loss)
  preset    build the embedded default model (`python -m trainer --preset shapes-tiny` is the same)
  pack      copy a built model folder compactly (fp16 DiT / DC-AE), as shipped in assets/shapes-tiny
  demo      prompts → PNG grid with a model folder (default: the shipped shapes-tiny model)
  evaluate  shapes-world prompt adherence of a model folder on held-out prompts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sana.cli import add_debug_option, report_error
from sana.errors import SanaCheckpointError, SanaError, SanaInputError

from . import distributed
from .options import parse_bool, add_options, build_config
from .shapes_model import SHIPPED_MODEL_DIR

DEFAULT_MODEL_DIR = "models/shapes-tiny"  # where the preset builds a model
CACHE_DESCRIPTION = """Encode an image folder (or JSONL manifest) with the DC-AE and its captions with the text encoder,
on the accelerator by default. Rerun it after adding images: only the new ones are encoded. A cache
whose settings, models or captions changed is refused, naming what changed."""


def _cache_command(args: argparse.Namespace) -> None:
    from .cache import build_cache, check_cache_options, encode_dtype, training_resolution
    from .data import read_records

    resolution = args.resolution
    if resolution is None:
        if not args.dit:
            raise SanaInputError("--resolution: give the training resolution (the DiT's: 1024 for Sana_1600M_1024px), "
                                 "or --dit to read it from the model you will train")
        resolution = training_resolution(args.dit, args.vae)
        print(f"--resolution {resolution} (the training resolution of {args.dit})", file=sys.stderr)
    check_cache_options(resolution=resolution, shard_size=args.shard_size, batch_size=args.batch_size,
                        max_length=args.max_length, min_bucket_size=args.min_bucket_size)
    encode_dtype(distributed.pick_device(args.device), args.dtype)  # refused before the data is read
    for option, path in (("--vae", args.vae), ("--text-encoder", args.text_encoder), ("--data", args.data),
                         ("--control-dir", args.control_dir)):
        if path is not None and not Path(path).exists():
            raise SanaInputError(f"{option} {path}: no such file or folder")
    distributed.set_cpu_threads(args.threads)
    summary = build_cache(
        read_records(args.data, control_dir=args.control_dir), args.cache_dir, vae=args.vae, text_encoder=args.text_encoder,
        resolution=resolution, shard_size=args.shard_size, batch_size=args.batch_size, max_length=args.max_length,
        chi=args.chi, sample_prompts=args.sample_prompts, flip=args.flip, min_bucket_size=args.min_bucket_size,
        device=args.device, dtype=args.dtype, min_psnr=args.min_psnr, progress=not args.no_progress,
    )
    # The lists of left-out files stay in cache.json; the counts are printed.
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or k in ("buckets",)}, indent=2))


CONTROLNET_DEMO_DESCRIPTION = """Train a ControlNet for the shipped shapes-tiny model on the CPU (a few minutes): shapes-world
images with their edge maps and captions without position words, cached, then `trainer controlnet`.
Then generate the held-out scenes from position-free prompts without and with each scene's edge map
and score where the shapes land (the shapes evaluator's position score; colour and shape too)."""


def _preset_overrides(items: list[str]) -> dict:
    """`--set SECTION.KEY=JSON` items → {"SECTION.KEY": value}."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise SanaInputError(f"--set {item!r}: expected SECTION.KEY=JSON, e.g. dit_training.steps=100")
        try:
            overrides[key] = json.loads(text)
        except ValueError as error:
            raise SanaInputError(f"--set {item!r}: the value is not JSON ({error}); quote strings, e.g. key='\"text\"'") from None
    return overrides


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per task, each documenting every option."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    from .dit_config import DiTTrainConfig
    from .train_dcae import DCAETrainConfig

    cache = commands.add_parser("cache", help="build the latent / text-embedding cache", description=CACHE_DESCRIPTION)
    cache.add_argument("--data", required=True, help="image folder (same-name .txt captions) or JSONL manifest")
    cache.add_argument("--cache-dir", required=True, help="output folder of safetensors shards (resumable, updated incrementally)")
    cache.add_argument("--vae", required=True, help="DC-AE checkpoint (anything sana load_dcae reads)")
    cache.add_argument("--text-encoder", required=True, help="Gemma-2 folder (anything sana.load_text_encoder reads)")
    cache.add_argument("--control-dir", default=None, help="a ControlNet's control images: a folder holding one per image of "
                       "--data, at the same relative path (a JSONL manifest names them in a \"control\" key instead)")
    cache.add_argument("--resolution", type=int, default=None, help="training resolution; images go to its aspect-ratio bins (default: --dit's)")
    cache.add_argument("--dit", default=None, help="the DiT you will train: --resolution defaults to its training resolution")
    cache.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto: the accelerator when there is one (default: auto)")
    cache.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="encoders' dtype (default: auto, bf16 on an accelerator, fp32 on the CPU)")
    cache.add_argument("--shard-size", type=int, default=512, help="samples per shard (default: 512)")
    cache.add_argument("--batch-size", type=int, default=16, help="images (and captions) encoded at once; bounds the pixels in memory (default: 16)")
    cache.add_argument("--max-length", type=int, default=300, help="caption tokens (default: 300)")
    cache.add_argument("--chi", type=parse_bool, default=True, metavar="BOOL", help="prepend the complex human instruction (default: true)")
    cache.add_argument("--flip", type=parse_bool, default=False, metavar="BOOL", help="also cache each image mirrored, for dit --flip (default: false: captions may name sides)")
    cache.add_argument("--min-bucket-size", type=int, default=1, help="merge aspect-ratio buckets with fewer images into the nearest one; give the training batch size (default: 1, no merging)")
    cache.add_argument("--min-psnr", type=float, default=20.0, help="warn when the DC-AE reconstructs the first images worse than this, in dB (default: 20; 0: off)")
    cache.add_argument("--sample-prompts", nargs="*", default=[], help="prompts to embed for sample grids during training")
    cache.add_argument("--threads", type=int, default=0, help="CPU threads (default: 0, the CPUs this process may use)")
    cache.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    add_options(commands.add_parser("dit", help="train the DiT (torchrun-ready)", description=DiTTrainConfig.__doc__), DiTTrainConfig)
    from .controlnet_config import ControlNetTrainConfig

    add_options(commands.add_parser("controlnet", help="train a ControlNet for a frozen DiT (torchrun-ready)",
                                    description=ControlNetTrainConfig.__doc__), ControlNetTrainConfig)
    add_options(commands.add_parser("dcae", help="train a small DC-AE", description=DCAETrainConfig.__doc__), DCAETrainConfig)

    from .controlnet_demo import DemoOptions

    defaults = DemoOptions()
    ctrl_demo = commands.add_parser("controlnet-demo", help="train a ControlNet for the shipped model on edge maps and score it",
                                    description=CONTROLNET_DEMO_DESCRIPTION)
    ctrl_demo.add_argument("--out-dir", default="runs/controlnet-demo", help="folder of the run (data, cache, run/, "
                           "controlnet_demo.json and .png; a rerun reuses it) (default: runs/controlnet-demo)")
    ctrl_demo.add_argument("--model", default=defaults.model, help=f"model folder whose DiT the ControlNet steers (default: {SHIPPED_MODEL_DIR})")
    for name, help_text in (("count", "training images"), ("steps", "training steps"), ("batch_size", "batch size"),
                            ("lr", "learning rate"), ("controlnet_blocks", "DiT blocks the ControlNet copies"),
                            ("ema_decay", "EMA decay (the EMA weights are evaluated)"), ("seed", "seed of the data and training"),
                            ("seeds", "evaluation images per held-out scene"), ("sample_steps", "sampling steps"),
                            ("guidance_scale", "CFG scale")):
        default = getattr(defaults, name)
        ctrl_demo.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                               help=f"{help_text} (default: {default})")
    ctrl_demo.add_argument("--threads", type=int, default=0, help="CPU threads (default: 0, the CPUs this process may use)")
    ctrl_demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    preset = commands.add_parser("preset", help="build the embedded default model")
    preset.add_argument("name", nargs="?", default="shapes-tiny", help="preset name (trainer/presets/<name>.json)")
    preset.add_argument("--output-dir", default=DEFAULT_MODEL_DIR, help=f"model folder to build (default: {DEFAULT_MODEL_DIR})")
    preset.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=JSON", help="override preset values, e.g. dit_training.steps=100")
    preset.add_argument("--no-progress", action="store_true", help="hide progress bars")
    preset.add_argument("--threads", type=int, default=0, help="CPU threads (default: 0, the CPUs this process may use; "
                        "more threads than free cores slows a shared machine down many times)")

    pack = commands.add_parser("pack", help="copy a model folder compactly for shipping")
    pack.add_argument("--model", default=DEFAULT_MODEL_DIR, help=f"model folder built by the preset (default: {DEFAULT_MODEL_DIR})")
    pack.add_argument("--out", required=True, help=f"folder to write (to update the shipped model: {SHIPPED_MODEL_DIR} --overwrite)")
    pack.add_argument("--overwrite", action="store_true", help="replace --out when it exists (only a model folder is replaced)")
    pack.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="storage dtype of the DiT and DC-AE weights (default: float16)")

    demo = commands.add_parser("demo", help="prompts → PNG grid")
    demo.add_argument("prompts", nargs="*", help="prompts (default: eight shapes-world prompts)")
    demo.add_argument("--model", default=None, help=f"model folder (default: the shipped {SHIPPED_MODEL_DIR}; if it is absent, {DEFAULT_MODEL_DIR}, built with the shapes-tiny preset on first use)")
    demo.add_argument("--out", default="shapes_demo.png", help="PNG to write (default: shapes_demo.png)")
    demo.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    demo.add_argument("--steps", type=int, default=20, help="Flow-DPM-Solver steps (default: 20)")
    demo.add_argument("--guidance", type=float, default=4.5, help="CFG scale (default: 4.5)")
    demo.add_argument("--lora", default=None, help="a LoRA file to merge into the DiT first (e.g. runs/lora/lora_ema.safetensors)")

    evaluate = commands.add_parser("evaluate", help="shapes-world prompt adherence on held-out prompts")
    evaluate.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help=f"model folder (default: {SHIPPED_MODEL_DIR})")
    evaluate.add_argument("--seeds", type=int, default=2, help="images per prompt (default: 2)")
    evaluate.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    evaluate.add_argument("--guidance", type=float, default=4.5, help="CFG scale (default: 4.5)")
    evaluate.add_argument("--out-dir", default=None, help="also write evaluation.json and evaluation_grid.png here (default: print only)")

    for command in commands.choices.values():
        add_debug_option(command, top_level=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status (0 ok, 2 bad usage or any `SanaError`, printed as
    one `error: ...` line; `--debug` adds the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--preset"):  # `python -m trainer --preset shapes-tiny [...]`
        argv = ["preset", *([argv[0].split("=", 1)[1]] if "=" in argv[0] else []), *argv[1:]]
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except SanaError as error:
        rank = distributed.process_rank()
        if rank:  # under torchrun every rank reports its own failure: say whose it is
            error = type(error)(f"rank {rank}: {error}")
        return report_error(error, debug=args.debug)
    return 0


def _run(args: argparse.Namespace) -> None:
    from .dit_config import DiTTrainConfig
    from .train_dcae import DCAETrainConfig

    if args.command == "cache":
        _cache_command(args)
    elif args.command == "dit":
        from .train_dit import train_dit

        summary = train_dit(build_config(DiTTrainConfig, args))
        summary.pop("model")
        distributed.shutdown()  # under torchrun: leave the process group cleanly
        if distributed.process_rank() == 0:  # one summary, not one per rank
            print(json.dumps(summary))
    elif args.command == "controlnet":
        from .controlnet_config import ControlNetTrainConfig
        from .train_controlnet import train_controlnet

        summary = train_controlnet(build_config(ControlNetTrainConfig, args))
        summary.pop("model")
        distributed.shutdown()
        if distributed.process_rank() == 0:
            print(json.dumps(summary))
    elif args.command == "controlnet-demo":
        from dataclasses import fields

        from .controlnet_demo import DemoOptions, run_controlnet_demo

        options = DemoOptions(**{f.name: getattr(args, f.name) for f in fields(DemoOptions)})
        threads = distributed.set_cpu_threads(args.threads)
        print(json.dumps(run_controlnet_demo(args.out_dir, options, progress=not args.no_progress, threads=threads), indent=2))
    elif args.command == "dcae":
        from .train_dcae import train_dcae

        summary = train_dcae(build_config(DCAETrainConfig, args))
        distributed.shutdown()
        if distributed.process_rank() == 0:
            print(json.dumps(summary))
    elif args.command == "preset":
        from .preset import run_preset

        overrides = _preset_overrides(args.set)
        threads = distributed.set_cpu_threads(args.threads)
        print(json.dumps(run_preset(args.name, args.output_dir, progress=not args.no_progress, overrides=overrides,
                                    threads=threads), indent=2))
    elif args.command == "pack":
        import torch

        from .pack import pack_model

        print(f"wrote {pack_model(args.model, args.out, dtype=getattr(torch, args.dtype), overwrite=args.overwrite)}")
    elif args.command == "demo":
        from .preset import run_preset
        from .shapes_model import DEFAULT_DEMO_PROMPTS, demo as run_demo

        model = args.model
        if model is None:
            model = str(SHIPPED_MODEL_DIR) if (SHIPPED_MODEL_DIR / "transformer").is_dir() else DEFAULT_MODEL_DIR
        if not (Path(model) / "transformer").is_dir():
            if model != DEFAULT_MODEL_DIR:
                raise SanaCheckpointError(f"{model} is not a model folder (no transformer/ in it)")
            # Only when the shipped model is absent (an install without the repository's assets/).
            print(f"{SHIPPED_MODEL_DIR} and {model} not found: training the shapes-tiny model first (one time)")
            run_preset("shapes-tiny", model)
        if args.lora is not None and not Path(args.lora).is_file():
            raise SanaInputError(f"--lora {args.lora}: no such file")
        path = run_demo(model, args.prompts or DEFAULT_DEMO_PROMPTS, args.out, seed=args.seed, steps=args.steps,
                        guidance_scale=args.guidance, lora=args.lora)
        print(f"wrote {path}")
    elif args.command == "evaluate":
        from .evaluate import evaluate_model

        print(json.dumps(evaluate_model(args.model, seeds=args.seeds, steps=args.steps, guidance_scale=args.guidance, out_dir=args.out_dir), indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
