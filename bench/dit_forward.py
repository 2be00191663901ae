"""DiT forward time and peak memory: ours vs diffusers' SanaTransformer2DModel on the same weights.

    python bench/dit_forward.py                         # Sana-0.6B width, 1024px (32×32 latents), fp32 CPU
    python bench/dit_forward.py --clock cpu                 # CPU seconds instead of wall time (shared machine)
    python bench/dit_forward.py --device cuda --dtype bf16 --latent 128 --batch 16

Each implementation runs in its own process so that peak memory is its own. The caption is 300
tokens, of which `--valid-tokens` are real (the rest padding, as the Gemma encoder pads them);
`--valid-tokens 300` measures the no-padding case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_bytes, gib, machine, peak_bytes, reset_peak, time_it  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_one(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_grad_enabled(False)
    if args.impl == "ours":
        import sana

        model = sana.load_dit(args.weights, dtype=dtype, device=device)
        forward = lambda x, t, c, m: model(x, t, c, m)  # noqa: E731
    else:
        from diffusers import SanaTransformer2DModel

        model = SanaTransformer2DModel.from_pretrained(args.weights, torch_dtype=dtype).to(device).eval()
        forward = lambda x, t, c, m: model(x, c, t, encoder_attention_mask=m, return_dict=False)[0]  # noqa: E731
    g = torch.Generator().manual_seed(0)
    caption = 2304 if args.caption is None else args.caption
    x = torch.randn(args.batch, 32, args.latent, args.latent, generator=g).to(device, dtype)
    context = torch.randn(args.batch, 300, caption, generator=g).to(device, dtype)
    mask = torch.zeros(args.batch, 300, device=device)
    mask[:, : args.valid_tokens] = 1
    t = torch.full((args.batch,), 999, device=device)
    out = forward(x, t, context, mask)
    torch.save(out.float().cpu()[:, :, :4, :4].clone(), args.sample_out)
    base = current_bytes(device)
    reset_peak(device)
    median, best = time_it(lambda: forward(x, t, context, mask), device, args.repeats, warmup=0, clock=args.clock)
    return {"median_s": median, "min_s": best, "peak_bytes": peak_bytes(device), "weights_resident_bytes": base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sana-600m-1024")
    p.add_argument("--depth", type=int, default=None, help="cut the depth (default: the preset's)")
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 1024px)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--valid-tokens", type=int, default=40)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternate the implementations this many times, keep the best")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU seconds (for shared machines)")
    p.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--caption", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sample-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return

    import sana

    cfg = sana.DIT_PRESETS[args.preset]
    if args.depth:
        cfg = cfg.replace(depth=args.depth)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        sana.save_dit(sana.SanaDiT(cfg), Path(tmp) / "dit")  # random init, diffusers layout
        results: dict[str, dict] = {}
        # Alternate the implementations over rounds and keep each one's best round, so that
        # load from other processes on a shared machine hits both alike.
        for _ in range(args.rounds):
            for impl in ("diffusers", "ours"):
                sample = Path(tmp) / f"{impl}.pt"
                cmd = [sys.executable, __file__, "--impl", impl, "--weights", str(Path(tmp) / "dit"), "--sample-out", str(sample)]
                for name in ("latent", "batch", "valid_tokens", "dtype", "device", "repeats", "clock"):
                    cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                if impl not in results or r["median_s"] < results[impl]["median_s"]:
                    results[impl] = r
                results[impl]["sample"] = torch.load(sample)
    ref, ours = results["diffusers"], results["ours"]
    err = ((ours["sample"] - ref["sample"]).abs().max() / ref["sample"].abs().max()).item()
    print(f"machine: {machine()}")
    print(f"model: {args.preset} depth {cfg.depth}, {args.dtype}, batch {args.batch}, latent {args.latent}², "
          f"{args.valid_tokens}/300 caption tokens valid; clock: {args.clock}")
    for impl in ("diffusers", "ours"):
        r = results[impl]
        print(f"{impl:10s} median {r['median_s'] * 1000:9.1f} ms  min {r['min_s'] * 1000:9.1f} ms  "
              f"peak {gib(r['peak_bytes'])} (resident before forward {gib(r['weights_resident_bytes'])})")
    print(f"speed-up {ref['median_s'] / ours['median_s']:.2f}x; output rel. diff {err:.2e}")


if __name__ == "__main__":
    main()
