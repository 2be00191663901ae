"""GPU benchmark: SANA (ours, with the Triton kernels) against diffusers on the same random weights, bf16.

    python bench/gpu.py                      # everything, on the lent GPU (about 10 minutes on an H100)
    python bench/gpu.py --only dit --models 0.6b --sizes 1024
    python bench/gpu.py --only dcae,e2e
    python bench/gpu.py --dry-run            # tiny models on CPU, fp32, one repeat: checks the script runs

Measures, each against its compute floor:
- DiT forward (Sana-0.6B and 1.6B released shapes) at 1024² and 4096² (32² and 128² latents), batch
  1 and 16, 300 caption tokens: ours with the Triton kernels (`SANA_KERNELS=auto`), ours with
  the PyTorch references (`torch`), ours compiled as `generate(compile_model=True)` runs it
  (one fullgraph `torch.compile` graph replayed as a CUDA graph), and diffusers'
  `SanaTransformer2DModel`;
- DC-AE f32c32 decode at 1024² and 4096², untiled, ours vs diffusers' `AutoencoderDC`;
- end to end at 1024², 20 Flow-DPM-Solver steps with CFG (batch 2 through the DiT), via
  `bench/pipeline.py --full --compile` (ours eager, ours compiled, diffusers), as images/s.

Floors: the FLOPs of one call (counted by `torch.utils.flop_counter` on the reference path:
matmuls, convolutions, attention) over the bf16 matrix-product rate measured here (a large
GEMM timed with CUDA events), so "x floor" is how many times slower than a machine that only
did the necessary arithmetic at the GEMM rate. The copy bandwidth is printed for reference
(the norms and the depthwise conv are bandwidth-bound; their bytes are not in the floor).
The FLOPs are our model's: the DC-AE's folded upsampling does 4 instead of 9 taps per output
pixel, so its floor is below what diffusers' layer-as-written computes (a stricter bar for us).

Timing: CUDA events around each call, `--warmup` untimed calls, median of `--repeats`. Peak
memory is `torch.cuda.max_memory_allocated` during the timed calls minus what was allocated
before them (so the weights of the other implementation, resident in the same process, do not
count); the weights' size is printed once per model. The full table is also written as JSON
to `--json` (default `$OUT/gpu_bench.json` when `$OUT` is set).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gib, machine  # noqa: E402

DIT_MODELS = {"0.6b": "sana-600m-1024", "1.6b": "sana-1600m-1024"}
SIZES = {1024: 32, 4096: 128}  # image side → latent side
CAPTION_TOKENS = 300

# --dry-run: the same code on CPU with shapes that run in seconds.
DRY_DIT = dict(hidden_size=64, depth=1, cross_attention_heads=2, cross_attention_head_dim=32, caption_channels=48)
DRY_SIZES = {1024: 4, 4096: 8}
DRY_DCAE_WIDTHS = (8, 16, 32, 32, 64, 64)


# ---------------------------------------------------------------------------------------------
# Measurement


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds per call and the peak memory the calls added."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        peak = 0
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def guarded(fn: Callable[[], dict]) -> dict:
    """Run one measurement; an out-of-memory is a result ("OOM"), not the end of the benchmark."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "OOM"}
    except Exception as e:  # keep going: one broken case must not hide the others
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from sana import ops

    with ops.use_kernels("torch"), FlopCounterMode(display=False) as counter:  # Triton launches are not counted
        fn()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, dtype: torch.dtype, dry_run: bool) -> float:
    """FLOP/s of a large dense GEMM on random data (the compute floor's rate)."""
    n = 256 if dry_run else 8192
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    r = timed(lambda: a @ b, device, warmup=2 if dry_run else 10, repeats=3 if dry_run else 50)
    return 2 * n**3 / r["seconds"]


def copy_bandwidth(device: torch.device, dry_run: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    n = (1 << 20) if dry_run else (1 << 30)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    r = timed(lambda: dst.copy_(src), device, warmup=2 if dry_run else 10, repeats=3 if dry_run else 50)
    return 2 * n / r["seconds"]


# ---------------------------------------------------------------------------------------------
# Models (random weights, shared by both implementations)


def build_dits(preset: str, device: torch.device, dtype: torch.dtype, dry_run: bool):
    """Ours and diffusers' DiT with identical random weights."""
    from diffusers import SanaTransformer2DModel

    import sana
    from sana.dit_io import diffusers_config, dit_state_dict

    config = sana.DIT_PRESETS[preset]
    if dry_run:
        config = config.replace(**DRY_DIT)
    torch.manual_seed(0)
    with torch.device(device):
        ours = sana.SanaDiT(config)
    with torch.no_grad():  # spread the otherwise tiny adaLN tables so every block matters
        for name, p in ours.named_parameters():
            if "scale_shift_table" in name:
                p.normal_(0, 0.3)
    ours = ours.to(dtype).eval()
    ours.trim_padded_context = False  # the sync-free path (nothing to trim: all caption tokens are valid)
    kwargs = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    with torch.device(device):
        theirs = SanaTransformer2DModel(**kwargs).to(dtype).eval()
    theirs.load_state_dict(dit_state_dict(ours, "diffusers"))
    return ours, theirs


def build_dcaes(device: torch.device, dtype: torch.dtype, dry_run: bool):
    from diffusers import AutoencoderDC

    from sana.dcae import DCAE_PRESETS, build_dcae
    from sana.dcae_io import diffusers_config, state_in_layout

    config = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]
    if dry_run:
        config = config.replace(encoder_widths=DRY_DCAE_WIDTHS, decoder_widths=DRY_DCAE_WIDTHS)
    torch.manual_seed(1)
    ours = build_dcae(config, device=device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norm affines on top of the default conv init
        for name, p in ours.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    ours = ours.to(dtype).eval()
    kwargs = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    with torch.device(device):
        theirs = AutoencoderDC(**kwargs).to(dtype).eval()
    theirs.load_state_dict(state_in_layout(ours, "diffusers"))
    return ours, theirs


# ---------------------------------------------------------------------------------------------
# Cases


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def compiled_forward(dit, x, t, context, mask) -> Callable[[], torch.Tensor]:
    """Ours as `generate(compile_model=True)` runs it: one fullgraph graph, CUDA graphs on GPU
    (the first calls compile and record; `timed`'s warm-up absorbs them)."""
    from sana.pipeline import compiled_step

    torch._dynamo.reset()  # a fresh graph per case: the cases would otherwise exhaust the recompile limit
    step = compiled_step(lambda x_, t_: dit(x_, t_, context, mask, trim_context=False), x.device)
    return lambda: step(x, t)


def bench_dit(args, device, dtype, rate, rows: list[dict]) -> None:
    from sana import ops

    for model_key in args.models:
        ours, theirs = build_dits(DIT_MODELS[model_key], device, dtype, args.dry_run)
        weights = sum(p.numel() * p.element_size() for p in ours.parameters())
        print(f"# DiT {model_key}: {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M params, {gib(weights)} per copy",
              flush=True)
        cfg = ours.config
        for size in args.sizes:
            latent = (DRY_SIZES if args.dry_run else SIZES)[size]
            for batch in args.batches:
                g = torch.Generator().manual_seed(size + batch)
                x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
                context = torch.randn(batch, CAPTION_TOKENS, cfg.caption_channels, generator=g).to(device, dtype)
                mask = torch.ones(batch, CAPTION_TOKENS, device=device)
                t = torch.full((batch,), 700.0, device=device)
                case = f"DiT {model_key} {size}² b{batch}"
                with torch.inference_mode():
                    flops = guarded(lambda: {"flops": count_flops(lambda: ours(x, t, context, mask))})
                    outputs = {}

                    def run(impl: str) -> dict:
                        if impl == "diffusers":
                            fn = lambda: theirs(x, context, t, encoder_attention_mask=mask, return_dict=False)[0]  # noqa: E731
                            backend = "torch"
                        elif impl == "ours-compiled":
                            fn = compiled_forward(ours, x, t, context, mask)
                            backend = "auto"
                        else:
                            fn = lambda: ours(x, t, context, mask)  # noqa: E731
                            backend = "auto" if impl == "ours" else "torch"
                        # CUDA-graph trees record on the second or third call: keep those untimed.
                        warmup = max(args.warmup, 3) if impl == "ours-compiled" else args.warmup
                        with ops.use_kernels(backend):
                            outputs[impl] = fn().float()
                            return timed(fn, device, warmup, args.repeats)

                    for impl in ("ours", "ours-torch", "ours-compiled", "diffusers"):
                        r = guarded(lambda: run(impl))
                        if "diffusers" in outputs and impl == "diffusers" and "ours" in outputs:
                            r["rel_diff_vs_diffusers"] = rel_diff(outputs["ours"], outputs["diffusers"])
                        rows.append(summarise(case, impl, r, flops.get("flops"), rate))
                        print(format_row(rows[-1]), flush=True)
                    del outputs
        del ours, theirs
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_dcae(args, device, dtype, rate, rows: list[dict]) -> None:
    from sana import ops

    ours, theirs = build_dcaes(device, dtype, args.dry_run)
    print(f"# DC-AE: {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M params", flush=True)
    f = ours.config.spatial_compression
    for size in args.sizes:
        pixels = size if not args.dry_run else 32 * DRY_SIZES[size]
        g = torch.Generator().manual_seed(size)
        latents = torch.randn(1, ours.config.latent_channels, pixels // f, pixels // f, generator=g).to(device, dtype)
        case = f"DC-AE decode {size}²"
        with torch.inference_mode():
            untiled = dict(memory_budget=1 << 50)  # like for like: diffusers decodes untiled by default
            flops = guarded(lambda: {"flops": count_flops(lambda: ours.decode(latents, **untiled))})
            outputs = {}
            for impl in ("ours", "ours-torch", "diffusers"):
                if impl == "diffusers":
                    fn = lambda: theirs.decode(latents, return_dict=False)[0]  # noqa: E731
                else:
                    fn = lambda: ours.decode(latents, **untiled)  # noqa: E731

                def run() -> dict:
                    with ops.use_kernels("torch" if impl != "ours" else "auto"):
                        outputs[impl] = fn().float()
                        return timed(fn, device, args.warmup, args.repeats)

                r = guarded(run)
                if impl == "diffusers" and "ours" in outputs and "diffusers" in outputs:
                    r["rel_diff_vs_diffusers"] = rel_diff(outputs["ours"], outputs["diffusers"])
                rows.append(summarise(case, impl, r, flops.get("flops"), rate))
                print(format_row(rows[-1]), flush=True)
    del ours, theirs
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_end_to_end(args, rate, dit_rows: list[dict], rows: list[dict]) -> None:
    """`bench/pipeline.py --full` at 1024², 20 steps, CFG: its s/image rows, as images/s."""
    if args.dry_run:
        print("# end to end: skipped in a dry run (bench/pipeline.py has its own CPU mode)")
        return
    cmd = [sys.executable, str(ROOT / "bench" / "pipeline.py"), "--full", "--device", "cuda", "--dtype", "bf16",
           "--size", "1024", "--steps", "20", "--cfg", "4.5", "--rounds", str(args.e2e_rounds), "--compile"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout.strip())
    if proc.returncode:
        print(proc.stderr[-3000:])
        rows.append({"case": "end to end 1024² 20 steps CFG", "impl": "both", "error": f"exit {proc.returncode}"})
        return
    # Floor: 20 DiT calls at batch 2 (CFG) + one decode, from the FLOPs counted above (text encoder left out).
    per = {r["case"]: r.get("flops") for r in dit_rows if r["impl"] == "ours"}
    dit_b1, decode = per.get("DiT 0.6b 1024² b1"), per.get("DC-AE decode 1024²")
    floor_flops = 20 * 2 * dit_b1 + decode if dit_b1 and decode else None
    for impl in ("ours", "ours-compiled", "diffusers"):
        m = re.search(rf"^{impl}\s+([0-9.]+)", proc.stdout, re.MULTILINE)
        if not m:
            continue
        seconds = float(m.group(1))
        row = summarise("end to end 1024² 20 steps CFG", impl, {"seconds": seconds, "peak_bytes": 0}, floor_flops, rate)
        row["images_per_s"] = 1 / seconds
        rows.append(row)
        print(format_row(row) + f"  {1 / seconds:.2f} images/s", flush=True)


# ---------------------------------------------------------------------------------------------
# Report


def summarise(case: str, impl: str, r: dict, flops: int | None, rate: float) -> dict:
    row = {"case": case, "impl": impl, **r}
    if flops and "seconds" in r:
        row["flops"] = flops
        row["floor_s"] = flops / rate
        row["x_floor"] = r["seconds"] / row["floor_s"]
        row["tflops_achieved"] = flops / r["seconds"] / 1e12
    return row


def format_row(row: dict) -> str:
    head = f"{row['case']:28s} {row['impl']:13s}"
    if "error" in row:
        return f"{head} {row['error']}"
    text = f"{head} {row['seconds'] * 1000:10.2f} ms  peak +{gib(row['peak_bytes']):>10s}"
    if "floor_s" in row:
        text += f"  floor {row['floor_s'] * 1000:9.2f} ms  x{row['x_floor']:6.2f}  {row['tflops_achieved']:7.1f} TFLOP/s"
    if "rel_diff_vs_diffusers" in row:
        text += f"  |ours-diffusers|/|diffusers| {row['rel_diff_vs_diffusers']:.1e}"
    return text


def print_summary(rows: list[dict]) -> None:
    """Last: one line per case, ours against diffusers (the reply shows the end of the output)."""
    print("\nsummary (median ms; speed-up = diffusers / ours; x floor = ours / compute floor)")
    cases = dict.fromkeys(r["case"] for r in rows)
    for case in cases:
        by = {r["impl"]: r for r in rows if r["case"] == case}
        ours, ref = by.get("ours", {}), by.get("diffusers", {})
        if "seconds" not in ours or "seconds" not in ref:
            print(f"{case:32s} ours {ours.get('error', '-')}  diffusers {ref.get('error', '-')}")
            continue
        line = (f"{case:32s} ours {ours['seconds'] * 1000:9.2f}  diffusers {ref['seconds'] * 1000:9.2f}  "
                f"speed-up {ref['seconds'] / ours['seconds']:5.2f}x")
        if "x_floor" in ours:
            line += f"  x floor {ours['x_floor']:5.2f}"
        if ours.get("peak_bytes") or ref.get("peak_bytes"):
            line += f"  peak +{gib(ours['peak_bytes'])} vs +{gib(ref['peak_bytes'])}"
        compiled = by.get("ours-compiled", {})
        if "seconds" in compiled:
            line += f"  | compiled {compiled['seconds'] * 1000:9.2f}  speed-up {ref['seconds'] / compiled['seconds']:5.2f}x"
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="dit,dcae,e2e", help="comma list of dit, dcae, e2e")
    p.add_argument("--models", default="0.6b,1.6b", help="comma list of DiT models: 0.6b, 1.6b")
    p.add_argument("--sizes", default="1024,4096", help="comma list of image sides: 1024, 4096")
    p.add_argument("--batches", default="1,16", help="comma list of DiT batch sizes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--e2e-rounds", type=int, default=1, help="bench/pipeline.py rounds per implementation")
    p.add_argument("--json", default=None, help="write every row here (default $OUT/gpu_bench.json if $OUT is set)")
    p.add_argument("--dry-run", action="store_true", help="tiny models on CPU in fp32, one repeat")
    args = p.parse_args()
    args.only = set(args.only.split(","))
    args.models = args.models.split(",")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        args.warmup, args.repeats = 0, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu.py needs a CUDA GPU (or --dry-run)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True  # only fp32 leftovers; the models run in bf16

    from sana import ops

    rate = matmul_rate(device, dtype, args.dry_run)
    bandwidth = copy_bandwidth(device, args.dry_run)
    print(f"machine: {machine()}; torch {torch.__version__}; kernels: {ops.kernel_backend()} "
          f"(triton {'importable' if ops.triton_available() else 'missing'})")
    print(f"measured: {dtype} GEMM {rate / 1e12:.1f} TFLOP/s, copy {bandwidth / 1e9:.0f} GB/s; "
          f"median of {args.repeats} after {args.warmup} warm-up calls", flush=True)
    rows: list[dict] = []
    if "dit" in args.only:
        bench_dit(args, device, dtype, rate, rows)
    if "dcae" in args.only:
        bench_dcae(args, device, dtype, rate, rows)
    if "e2e" in args.only:
        bench_end_to_end(args, rate, rows, rows)
    print_summary(rows)
    out = args.json or (str(Path(os.environ["OUT"]) / "gpu_bench.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps({"machine": machine(), "gemm_flops": rate, "copy_bytes_per_s": bandwidth,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
