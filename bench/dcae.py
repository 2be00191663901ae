"""DC-AE decode: time and peak memory, ours vs diffusers' AutoencoderDC on the same weights, tiled and untiled.

Each configuration runs in a fresh subprocess, so its peak memory is its own: peak RSS
(`VmHWM`, reset just before the decode) on CPU, `torch.cuda.max_memory_allocated` on CUDA. The model is the SANA f32c32
layout with every width divided by `--width-divisor` (CPU default 16: full width takes hours
on a 2-core CPU), random weights, written once as a diffusers folder that both sides load.
The latents are the encoding of a smooth synthetic image, and the parent reports the PSNR of
each tiled decode against the same implementation's untiled decode (the seam/quality cost of
tiling) and the parity of our untiled decode with diffusers'.

    .venv/bin/python bench/dcae.py                                # CPU, width/16, 1024² 2048² 4096²
    .venv/bin/python bench/dcae.py --device cuda --width-divisor 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TILE, OVERLAP = 1024, 256  # ours: sana.dcae_tiling defaults, forced on
DIFFUSERS_TILINGS = {"diffusers-tiled-512": (512, 448), "diffusers-tiled-1024": (1024, 768)}


def smooth_image(size: int) -> torch.Tensor:
    y = torch.linspace(0, 1, size)[:, None]
    x = torch.linspace(0, 1, size)[None, :]
    channels = [
        0.6 * torch.sin(2 * math.pi * (a * x + b * y) + phase) + 0.3 * (x - y)
        for a, b, phase in ((1.0, 0.5, 0.0), (0.7, 1.3, 1.0), (1.6, 0.4, 2.0))
    ]
    return torch.stack(channels)[None].clamp(-1, 1)


def build_weights(folder: Path, divisor: int) -> None:
    from diffusers import AutoencoderDC

    from sana.dcae import DCAE_PRESETS
    from sana.dcae_io import diffusers_config

    base = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]
    config = base.replace(
        encoder_widths=tuple(w // divisor for w in base.encoder_widths),
        decoder_widths=tuple(w // divisor for w in base.decoder_widths),
    )
    torch.manual_seed(0)
    model = AutoencoderDC(**{k: v for k, v in diffusers_config(config).items() if not k.startswith("_")})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norm affines on top of the random conv init
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)


def proc_status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: now, VmHWM: peak of this process image)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS. ru_maxrss cannot be used:
    # it survives fork+exec, so a child would report the parent's peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    latents = torch.load(args.latents).to(device)
    if args.impl == "ours":
        from sana.dcae_io import load_dcae
        from sana.dcae_tiling import estimate_peak_bytes

        model = load_dcae(args.weights, device=device)
        if args.mode == "untiled":
            run = lambda z: model.decode(z, memory_budget=1 << 50)  # noqa: E731
            estimate = estimate_peak_bytes(model.config, "decode", *latents.shape[:1], *latents.shape[2:], torch.float32)
        else:
            run = lambda z: model.decode(z, tile_size=TILE, tile_overlap=OVERLAP)  # noqa: E731
            side = TILE // model.spatial_compression
            estimate = estimate_peak_bytes(model.config, "decode", 1, side, side, torch.float32)
    else:
        from diffusers import AutoencoderDC

        model = AutoencoderDC.from_pretrained(args.weights).to(device).eval()
        if args.mode != "untiled":
            tile, stride = DIFFUSERS_TILINGS[args.mode]
            model.enable_tiling(tile, tile, stride, stride)
        run = lambda z: model.decode(z).sample  # noqa: E731
        estimate = None
    with torch.inference_mode():
        run(latents[:, :, :2, :2])  # warm-up: first-call allocations and kernel selection
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if device.type == "cpu":
            reset_peak_rss()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else proc_status("VmRSS")
        start = time.perf_counter()
        out = run(latents)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = proc_status("VmHWM")
    torch.save(out.float().cpu(), args.output)
    print(json.dumps({"seconds": seconds, "peak": peak, "base": base, "estimate": estimate}))


def psnr(got: torch.Tensor, ref: torch.Tensor) -> float:
    peak = (ref.max() - ref.min()).item()
    mse = (got.double() - ref.double()).pow(2).mean().item()
    return 10 * math.log10(peak**2 / mse) if mse > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--width-divisor", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modes", default="ours:untiled,diffusers:untiled,ours:tiled,"
                        + ",".join(f"diffusers:{m}" for m in DIFFUSERS_TILINGS))
    parser.add_argument("--workdir", default=None, help="keep weights/latents/outputs here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl"), parser.add_argument("--mode"), parser.add_argument("--weights")
    parser.add_argument("--latents"), parser.add_argument("--output")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dcae_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "weights"
    build_weights(weights, args.width_divisor)
    from sana.dcae_io import load_dcae

    encoder = load_dcae(weights).to(args.device)
    print(f"# DC-AE decode bench: SANA f32c32 layout, widths/{args.width_divisor}, fp32, {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print("| size | implementation | mode | time (s) | peak (MiB) | peak − before (MiB) | our estimate (MiB) | PSNR vs untiled (dB) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        latents_path = work / f"latents_{size}.pt"
        with torch.inference_mode():
            # Tiled so that the parent's own memory stays small; only the latents matter here.
            latents = encoder.encode(smooth_image(size).to(args.device), tile_size=2048, tile_overlap=512)
        torch.save(latents.cpu(), latents_path)
        outputs = {}
        for spec in args.modes.split(","):
            impl, mode = spec.split(":")
            out_path = work / f"out_{impl}_{mode}_{size}.pt"
            cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--mode", mode, "--weights", str(weights),
                   "--latents", str(latents_path), "--output", str(out_path), "--device", args.device,
                   "--threads", str(args.threads)]
            # A fixed mmap threshold makes glibc return every large freed buffer at once, so the
            # peak RSS is the peak of live tensors rather than of allocator retention.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                print(f"| {size}² | {impl} | {mode} | failed: {proc.stderr.strip().splitlines()[-1:]} |||||", flush=True)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[(impl, mode)] = out_path
            untiled = outputs.get((impl, "untiled"))
            quality = "—"
            if mode != "untiled" and untiled is not None:
                quality = f"{psnr(torch.load(out_path), torch.load(untiled)):.1f}"
            estimate = f"{result['estimate'] / 2**20:.0f}" if result["estimate"] else "—"
            print(f"| {size}² | {impl} | {mode} | {result['seconds']:.2f} | {result['peak'] / 2**20:.0f} | "
                  f"{(result['peak'] - result['base']) / 2**20:.0f} | {estimate} | {quality} |", flush=True)
        if ("ours", "untiled") in outputs and ("diffusers", "untiled") in outputs:
            ours, ref = torch.load(outputs[("ours", "untiled")]), torch.load(outputs[("diffusers", "untiled")])
            print(f"|  | parity {size}² | max abs diff / max abs ref = {(ours - ref).abs().max() / ref.abs().max():.2e} ||||||",
                  flush=True)
        for path in outputs.values():
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
