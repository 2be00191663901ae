"""Headless command line: `python -m sana generate ...` and `python -m sana convert ...`.

    python -m sana generate --dit DIT --vae VAE --text-encoder GEMMA_DIR --prompt "a cat" --out cat.png
    python -m sana generate ... --steps 2 --sprint                # SANA-Sprint (TrigFlow)
    python -m sana generate ... --image in.png --strength 0.6     # image to image
    python -m sana generate ... --prompts prompts.jsonl --out-dir out/ --batch-size 8   # batch mode (sana.batch)
    torchrun --nproc_per_node 8 -m sana generate ... --prompts prompts.jsonl --out-dir out/   # one share per GPU
    python -m sana generate --replay out/000012.png               # the image again, from its own record
    python -m sana generate ... --controlnet Sana_1600M_1024px_BF16_ControlNet_HED.pth --control-image edges.png
    python -m sana convert dit Sana_1600M_1024px.pth sana_1600m_diffusers/
    python -m sana convert dit output/checkpoints/latest.pth my_ema.safetensors --ema   # NVlabs training EMA
    python -m sana convert vae dc-ae-f32c32-sana-1.1-diffusers/ dc-ae.safetensors --format original
    python -m sana doctor --model sana-1600m-4k --size 4096x4096  # kernels on this device, memory plan

`generate` prints a progress bar (tqdm when installed) and writes PNGs, each atomically (a
full disk or a kill mid-write leaves any earlier file of that name intact); several images go to
`out-0.png`, `out-1.png`, ... Width and height default to the DiT's native size (1024 for the
1024px models, 128 for the shipped `assets/shapes-tiny`). The DC-AE never runs in fp16 (it
overflows there): `--vae-dtype fp16` is refused. Unusable files and values (any
`sana.errors.SanaError`: a stage that produced NaN/inf, an output file that cannot be written)
end with one `error:` line naming what is at fault and exit status 2, as argparse's usage errors
do, and no PNG is written; options are checked before any model is loaded; `--debug` shows the
traceback as well. `convert` reads any supported layout with `sana.load_dit` /
`sana.dcae_io.load_dcae` and writes with `sana.save_dit` / `save_dcae`: one key map each (a
DC-AE keeps its stored dtype unless `--dtype` says otherwise).

Every PNG `generate` writes carries its generation record (`sana.provenance`): the A1111
`parameters` text and the exact `sana` JSON that `--replay` reads (`sana.replay`); without
`--seed` a random seed is drawn here, so the image records it. Batch mode (`--prompts FILE
--out-dir DIR`, `sana.batch`) reads a text or JSONL prompts file, checks every line before any
model loads, and under `torchrun` gives each process its share; it exits with status 1 when
some items failed (each recorded in `DIR/index.jsonl`) and 0 when all are done.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import batch, doctor
from .batch import DEFAULT_FLOW_STEPS, DEFAULT_SPRINT_STEPS
from .checkpoint import pipeline_subfolder
from .errors import SanaCheckpointError, SanaError, SanaInputError
from .png import read_image, write_png

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AUTO_SOLVER = "auto"
PNG_SUFFIXES = (".png",)
EXIT_ERROR = 2  # argparse's status for bad usage; the CLIs use it for every SanaError too
# `generate` argument -> the option that sets it, for error messages.
OPTION_NAMES = {
    "steps": "--steps", "guidance_scale": "--cfg", "pag_scale": "--pag", "flow_shift": "--shift", "seed": "--seed",
    "strength": "--strength", "batch_size": "--batch-size", "height": "--height", "width": "--width",
    "control_scale": "--control-scale", "control_start": "--control-start", "control_end": "--control-end",
}


# ---------------------------------------------------------------------------------------
# Images on disk


def output_paths(out: Path, count: int) -> list[Path]:
    """`out` itself for one image, else `stem-0.png`, `stem-1.png`, ... next to it."""
    if out.suffix.lower() not in PNG_SUFFIXES:
        out = out.with_suffix(out.suffix + ".png") if out.suffix else out.with_suffix(".png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


# ---------------------------------------------------------------------------------------
# Progress


def progress_callback(stream=None) -> tuple[Callable[[int, int, torch.Tensor], None], Callable[[], None]]:
    """(callback for `generate`, close): a tqdm bar on `stream` (default: stderr) if tqdm is
    importable, else one line per step."""
    stream = stream if stream is not None else sys.stderr
    state: dict = {}
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None

    def callback(step: int, total: int, x0: torch.Tensor) -> None:
        if tqdm is not None:
            if "bar" not in state:
                state["bar"] = tqdm(total=total, desc="denoising", unit="step", file=stream)
            state["bar"].update(1)
        else:
            print(f"step {step + 1}/{total}", file=stream, flush=True)

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    return callback, close


# ---------------------------------------------------------------------------------------
# Commands


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(name: str | None, device: str) -> torch.dtype:
    # SANA's released weights are bf16; on CPU fp32 is the fast and exact choice.
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def check_output_path(out: Path) -> None:
    """Refuse, before any loading, an output PNG path that is a folder or whose nearest existing
    parent is not a writable folder: the images could never be written there."""
    path = output_paths(out, 1)[0]
    if path.is_dir():
        raise SanaInputError(f"--out: {path} is a folder; give a file name such as {path / 'image.png'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SanaCheckpointError(f"cannot write the image {path}: {parent} is not a writable folder")


def generation_mode(args: argparse.Namespace) -> str:
    """"single" (--prompt, --out), "batch" (--prompts FILE, --out-dir DIR) or "replay"
    (--replay IMAGE.png); `SanaInputError` for a missing or mixed choice, before anything loads."""
    chosen = [name for name, given in (("--prompt", args.prompt), ("--prompts", args.prompts), ("--replay", args.replay)) if given]
    if len(chosen) != 1:
        what = "none" if not chosen else " and ".join(chosen)
        raise SanaInputError(f"give one of --prompt TEXT (with --out), --prompts FILE (with --out-dir) or --replay IMAGE.png; got {what}")
    mode = {"--prompt": "single", "--prompts": "batch", "--replay": "replay"}[chosen[0]]
    if mode == "batch" and (args.out or not args.out_dir):
        raise SanaInputError("--prompts writes into --out-dir DIR (one PNG per item), not --out")
    if mode != "batch" and args.out_dir:
        raise SanaInputError("--out-dir is for --prompts FILE; give --out for one image")
    if mode == "single" and not args.out:
        raise SanaInputError("--prompt needs --out (the PNG to write)")
    if mode == "batch" and args.image:
        raise SanaInputError("--image (image to image) is for --prompt; --prompts generates from text only")
    if mode != "replay":
        missing = [option for option, value in (("--dit", args.dit), ("--vae", args.vae), ("--text-encoder", args.text_encoder)) if not value]
        if missing:
            raise SanaInputError(f"missing {', '.join(missing)}: the model files to generate with")
    return mode


def _batch_options(args: argparse.Namespace, device: str) -> batch.BatchOptions:
    solver = "trigflow" if args.sprint else (None if args.solver == AUTO_SOLVER else args.solver)
    defaults = batch.Defaults(
        negative_prompt=args.negative_prompt, seed=args.seed if args.seed is not None else 0, width=args.width,
        height=args.height, steps=args.steps, guidance_scale=args.cfg, flow_shift=args.shift, pag_scale=args.pag,
        solver=solver, pag_layers=args.pag_layers, chi=not args.no_chi, resolution_binning=not args.no_binning,
        control_scale=args.control_scale, control_start=args.control_start, control_end=args.control_end,
    )
    return batch.BatchOptions(
        prompts_file=Path(args.prompts), out_dir=Path(args.out_dir),
        model_paths={"dit": args.dit, "vae": args.vae, "text_encoder": args.text_encoder},
        dtypes={"dit": _dtype(args.dtype, device), "vae": _dtype(args.vae_dtype, device),
                "text_encoder": _dtype(args.text_encoder_dtype, device)},
        device=device, defaults=defaults,
        batch_size=args.batch_size, compile_model=args.compile, controlnet=args.controlnet, control_image=args.control_image,
    )


def _single_record_text(args, dit, dcae, text_encoder, controlnet, *, solver: str, steps: int, seed: int,
                        count: int) -> list[dict[str, str]]:
    """Each image's PNG text chunks (`sana.provenance`): the request `generate` got, resolved."""
    from sana.provenance import describe_models, file_sha256, make_record, png_text

    defaults = batch.Defaults(
        negative_prompt=args.negative_prompt, width=args.width, height=args.height, steps=steps,
        guidance_scale=args.cfg, flow_shift=args.shift, pag_scale=args.pag, solver=solver, pag_layers=args.pag_layers,
        chi=not args.no_chi, resolution_binning=not args.no_binning,
        control_scale=args.control_scale, control_start=args.control_start, control_end=args.control_end,
    )
    prompt = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    request = batch.resolve_request(dit, dcae, prompt=prompt, seed=seed, defaults=defaults, control=controlnet is not None)
    request["batch_size"] = args.batch_size
    extra = {}
    if args.image:
        request["strength"] = args.strength
        extra["image"] = {"path": os.path.abspath(args.image), "sha256": file_sha256(Path(args.image))}
    if controlnet is not None:
        described = describe_models({"controlnet": args.controlnet})["controlnet"]
        extra["controlnet"] = {**described, "dtype": str(controlnet.dtype).removeprefix("torch.")}
        extra["control_image"] = {"path": os.path.abspath(args.control_image), "sha256": file_sha256(Path(args.control_image))}
    parts = batch.Parts(dit, dcae, text_encoder)
    models = describe_models({"dit": args.dit, "vae": args.vae, "text_encoder": args.text_encoder})
    models = {c: {**m, "dtype": batch.dtype_names(parts)[c]} for c, m in models.items()}
    return [png_text(make_record(request, models, image_index=i, extra=extra)) for i in range(count)]


def command_generate(args: argparse.Namespace) -> int:
    import sana
    from sana.dcae import check_dcae_dtype
    from sana.dcae_io import load_dcae
    from sana.pipeline import SEED_LIMIT, check_sampling_values, generate
    from sana.sampling import TRIGFLOW, select_solver

    mode = generation_mode(args)
    if mode == "replay":
        return command_replay(args)
    device = args.device or _default_device()
    # Every option a model is not needed to judge, before anything is loaded.
    check_sampling_values(
        steps=args.steps if args.steps is not None else DEFAULT_FLOW_STEPS, guidance_scale=args.cfg,
        pag_scale=args.pag, flow_shift=args.shift, seed=args.seed, strength=args.strength,
        batch_size=args.batch_size, height=args.height, width=args.width, control_scale=args.control_scale,
        control_start=args.control_start, control_end=args.control_end, names=OPTION_NAMES,
    )
    if (args.controlnet is None) != (args.control_image is None) and not (mode == "batch" and args.controlnet):
        # Batch mode's items may each name their control image (`sana.batch.check_control_inputs`).
        raise SanaInputError("--controlnet and --control-image go together: a ControlNet is steered by a control image")
    check_dcae_dtype(DTYPES.get(args.vae_dtype), "--vae-dtype")
    if mode == "batch":
        return batch.run(_batch_options(args, device))
    check_output_path(Path(args.out))
    image = read_image(Path(args.image)) if args.image else None
    control_image = read_image(Path(args.control_image)) if args.control_image else None
    started = time.perf_counter()
    dit = sana.load_dit(args.dit, dtype=_dtype(args.dtype, device), device=device)
    controlnet = sana.load_controlnet(args.controlnet, dtype=dit.dtype, device=device) if args.controlnet else None
    dcae = load_dcae(args.vae, dtype=_dtype(args.vae_dtype, device), device=device)
    # Loaded on the CPU: generate moves it to the compute device only while encoding.
    text_encoder = sana.load_text_encoder(args.text_encoder, dtype=_dtype(args.text_encoder_dtype, device))
    print(f"loaded DiT {dit.config.variant}, DC-AE, text encoder in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    solver = TRIGFLOW if args.sprint else (None if args.solver == AUTO_SOLVER else args.solver)
    solver = select_solver(dit, solver)
    steps = args.steps if args.steps is not None else (DEFAULT_SPRINT_STEPS if solver == TRIGFLOW else DEFAULT_FLOW_STEPS)
    # A random seed is drawn here rather than in generate, so that the image records it.
    seed = args.seed if args.seed is not None else secrets.randbelow(SEED_LIMIT)
    count = len(args.prompt) * args.batch_size
    texts = _single_record_text(args, dit, dcae, text_encoder, controlnet, solver=solver, steps=steps, seed=seed, count=count)
    callback, close = progress_callback()
    started = time.perf_counter()
    try:
        images = generate(
            dit=dit,
            dcae=dcae,
            text_encoder=text_encoder,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            steps=steps,
            guidance_scale=args.cfg,
            flow_shift=args.shift,
            solver=solver,
            seed=seed,
            chi=not args.no_chi,
            pag_scale=args.pag,
            pag_layers=args.pag_layers,
            resolution_binning=not args.no_binning,
            batch_size=args.batch_size,
            image=image,
            strength=args.strength,
            callback=callback,
            compile_model=args.compile,
            controlnet=controlnet,
            control_image=control_image,
            control_scale=args.control_scale,
            control_start=args.control_start,
            control_end=args.control_end,
        )
    finally:
        close()
    paths = output_paths(Path(args.out), images.shape[0])
    for path, picture, text in zip(paths, images, texts):
        write_png(path, picture, text)
    print(f"wrote {', '.join(map(str, paths))} ({solver}, {steps} steps, seed {seed}, {time.perf_counter() - started:.1f} s)",
          file=sys.stderr)
    return 0


def command_replay(args: argparse.Namespace) -> int:
    """`generate --replay IMAGE.png`: the image again from its own record (`sana.replay`)."""
    from sana.replay import replay

    overrides = {"dit": args.dit, "vae": args.vae, "text_encoder": args.text_encoder}
    dtypes = {"dit": args.dtype, "vae": args.vae_dtype, "text_encoder": args.text_encoder_dtype}
    callback, close = progress_callback()
    try:
        replay(
            Path(args.replay), out=Path(args.out) if args.out else None,
            paths={k: v for k, v in overrides.items() if v},
            dtypes={k: DTYPES[v] for k, v in dtypes.items() if v}, device=args.device or _default_device(),
            image_input=Path(args.image) if args.image else None, callback=callback, compile_model=args.compile,
            controlnet=args.controlnet, control_image=Path(args.control_image) if args.control_image else None,
        )
    finally:
        close()
    return 0


def command_convert(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    source, target = Path(args.source), Path(args.target)
    if args.component == "dit":
        import sana

        fmt = args.format or ("official" if target.suffix.lower() in (".pth", ".pt") else "diffusers")
        if fmt not in ("diffusers", "official"):
            raise SanaInputError(f"a DiT is written as 'diffusers' or 'official', not {fmt!r}")
        model = sana.load_dit(source, dtype=dtype, config=args.config, ema=args.ema)
        sana.save_dit(model, target, format=fmt)
        target = pipeline_subfolder(target, "transformer") if fmt == "diffusers" else target
        what = f"DiT {model.config.variant}"
    else:
        if args.ema:
            raise SanaInputError("--ema picks a DiT training checkpoint's EMA weights; a DC-AE file has none")
        from sana.dcae_io import load_dcae, save_dcae, stored_dcae_dtype

        if args.format not in (None, "diffusers", "original"):
            raise SanaInputError(f"a DC-AE is written as 'diffusers' or 'original', not {args.format!r}")
        # Loaded in a dtype it can run in (never fp16), then stored as asked or as it was.
        model = load_dcae(source, config=args.config)
        dtype = dtype or stored_dcae_dtype(source)
        save_dcae(model, target, layout=args.format, dtype=dtype)
        fmt = args.format or ("diffusers" if not target.suffix else "original")
        target = pipeline_subfolder(target, "vae") if fmt == "diffusers" else target
        what = f"DC-AE {model.config.name}"
    print(f"wrote {target}: {what}, {fmt} layout, {dtype or model.dtype}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sana", description="SANA text-to-image without ComfyUI.")
    add_debug_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images from a prompt, a prompts file, or an image's own record")
    add_debug_option(gen, top_level=False)
    gen.add_argument("--dit", help="DiT checkpoint: NVlabs .pth/.safetensors, diffusers folder or file")
    gen.add_argument("--vae", help="DC-AE checkpoint: original .safetensors or diffusers folder")
    gen.add_argument("--text-encoder", help="Gemma-2 folder (config, weights, tokenizer)")
    gen.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    gen.add_argument("--prompts", metavar="FILE",
                     help="batch mode: a text file (one prompt a line) or JSONL (prompt, negative_prompt, seed, width, "
                          "height, steps, cfg, shift, pag, solver, meta), one PNG per item into --out-dir; resumable; "
                          "under torchrun each process takes its share")
    gen.add_argument("--out-dir", metavar="DIR", help="batch mode: the folder for NNNNNN.png and index.jsonl")
    gen.add_argument("--replay", metavar="IMAGE", help="generate an image again from the record it carries "
                     "(models from the record unless --dit/--vae/--text-encoder are given; output: --out or IMAGE-replay.png)")
    gen.add_argument("--negative-prompt", default="", help="CFG's negative prompt (no CHI; unused by Sprint)")
    gen.add_argument("--out", help="output PNG; several images get -0, -1, ... suffixes")
    gen.add_argument("--steps", type=int, default=None, help=f"default {DEFAULT_FLOW_STEPS}, or {DEFAULT_SPRINT_STEPS} for Sprint")
    gen.add_argument("--cfg", type=float, default=4.5, help="guidance scale (embedded guidance for Sprint)")
    gen.add_argument("--pag", type=float, default=0.0, help="perturbed-attention guidance scale (0: off)")
    gen.add_argument("--pag-layers", type=int, nargs="+", default=None, help="PAG blocks (default: NVlabs' per model)")
    gen.add_argument("--width", type=int, default=None, help="pixels, at most 16384 (default: the DiT's native size)")
    gen.add_argument("--height", type=int, default=None, help="pixels, at most 16384 (default: the DiT's native size)")
    gen.add_argument("--seed", type=int, default=None,
                     help="an integer in [0, 2^64) (default: random); with --prompts, the base seed: an item without "
                          "its own gets seed + its number (default 0)")
    gen.add_argument(
        "--solver",
        choices=[AUTO_SOLVER, "flow_dpm_solver", "flow_euler", "trigflow"],
        default=AUTO_SOLVER,
        help="auto: trigflow for a Sprint DiT, flow_dpm_solver otherwise",
    )
    gen.add_argument("--sprint", action="store_true", help="SANA-Sprint: TrigFlow sampling (same as --solver trigflow)")
    gen.add_argument("--shift", type=float, default=None, help="flow shift (default: the model's, 3 or 6 for 4K)")
    gen.add_argument("--no-chi", action="store_true", help="encode the prompt without the complex human instruction")
    gen.add_argument("--no-binning", action="store_true", help="sample at the exact size (a multiple of 32)")
    gen.add_argument("--batch-size", type=int, default=1,
                     help="images per prompt; with --prompts, items per forward pass (items of one size and settings)")
    gen.add_argument("--image", default=None, help="input image for image-to-image")
    gen.add_argument("--strength", type=float, default=1.0, help="image-to-image denoising strength in (0, 1]")
    gen.add_argument("--controlnet", default=None,
                     help="ControlNet checkpoint: NVlabs .pth as released, or a diffusers folder or file (with --control-image; with --replay: where a recorded one moved)")
    gen.add_argument("--control-image", default=None, help="the ControlNet's control image (e.g. an HED edge map); with --prompts: for the items that name none")
    gen.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale in [0, 100]")
    gen.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps where the ControlNet starts")
    gen.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps where the ControlNet stops")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile each sampling step as one graph (CUDA graphs on GPU); pays off over many steps")
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.add_argument("--dtype", choices=list(DTYPES), default=None, help="DiT dtype (default: bf16 on cuda, fp32 on cpu)")
    gen.add_argument("--vae-dtype", choices=list(DTYPES), default=None,
                     help="DC-AE dtype (same default; fp16 is refused: the DC-AE overflows in it)")
    gen.add_argument("--text-encoder-dtype", choices=list(DTYPES), default=None, help="Gemma dtype (same default)")
    gen.set_defaults(run=command_generate)

    conv = commands.add_parser("convert", help="rewrite a DiT or DC-AE checkpoint in another layout")
    add_debug_option(conv, top_level=False)
    conv.add_argument("component", choices=["dit", "vae"])
    conv.add_argument("source", help="any layout the loader reads")
    conv.add_argument("target", help="a folder (diffusers) or a file (.pth / .safetensors)")
    conv.add_argument(
        "--format",
        choices=["diffusers", "official", "original"],
        default=None,
        help="DiT: diffusers | official; DC-AE: diffusers | original (default: from the target's suffix)",
    )
    conv.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast the weights (default: keep)")
    conv.add_argument(
        "--config",
        default=None,
        help="when detection cannot tell: a preset name, or for a DiT a diffusers config.json path",
    )
    conv.add_argument("--ema", action="store_true",
                      help="DiT: take the state_dict_ema weights of an NVlabs training checkpoint (default: state_dict)")
    conv.set_defaults(run=command_convert)

    diagnose = commands.add_parser("doctor", help="device, versions, kernel probes and timing choices, memory plan")
    add_debug_option(diagnose, top_level=False)
    doctor.add_arguments(diagnose)
    diagnose.set_defaults(run=doctor.run)
    return parser


def add_debug_option(parser: argparse.ArgumentParser, *, top_level: bool = True) -> None:
    """`--debug`, accepted before or after the command name (a subcommand's copy leaves the
    top level's value alone unless given)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="on an error, show the traceback as well as the message",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad usage or an unusable file or value)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SanaError as error:
        return report_error(error, debug=args.debug)


def report_error(error: SanaError, *, debug: bool) -> int:
    """Print `error: <message>` (and the traceback with `debug`) to stderr; the exit status 2."""
    if debug:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {error}", file=sys.stderr)
    return EXIT_ERROR


__all__ = ["EXIT_ERROR", "add_debug_option", "build_parser", "main", "output_paths", "read_image", "report_error", "write_png"]
