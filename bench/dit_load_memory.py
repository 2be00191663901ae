"""Peak memory of loading a DiT checkpoint: ours (streamed into a meta-built model) vs diffusers.

    python bench/dit_load_memory.py                    # Sana-0.6B (full size), every format, CPU
    python bench/dit_load_memory.py --preset sana-1600m-1024

Each load runs in a fresh process; the figures are the peak RSS during the load and the RSS
after it, minus the RSS before it, next to the size of the weights. "One copy" means a ratio
near 1.0. Memory-mapped loads (diffusers' safetensors, our `.pth`) show little: their pages
are read, and counted, only when the weights are first used.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_bytes, gib, machine, peak_bytes, reset_peak  # noqa: E402


def load_once(impl: str, path: str, dtype: str | None) -> dict:
    import sana  # noqa: F401  (imports out of the measured window)
    from diffusers import SanaTransformer2DModel

    device = torch.device("cpu")
    torch_dtype = getattr(torch, dtype) if dtype else None
    before = current_bytes(device)
    reset_peak(device)
    start = time.perf_counter()
    if impl == "ours":
        model = sana.load_dit(path, dtype=torch_dtype)
    else:
        model = SanaTransformer2DModel.from_pretrained(path, torch_dtype=torch_dtype)
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    resident = current_bytes(device) - before
    return {"seconds": seconds, "peak_over_base": peak_bytes(device) - before, "resident_over_base": resident, "weights": weights}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sana-600m-1024")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        impl, path, dtype = args.one
        print(json.dumps(load_once(impl, path, None if dtype == "-" else dtype)))
        return

    import sana

    cfg = sana.DIT_PRESETS[args.preset]
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = sana.SanaDiT(cfg)
        sana.save_dit(model, tmp / "diffusers")
        sana.save_dit(model, tmp / "official.pth", format="official")
        sana.save_dit(model, tmp / "official.safetensors", format="official")
        sana.save_dit(model.to(torch.bfloat16), tmp / "bf16", format="diffusers")
        del model
        cases = [
            ("ours", tmp / "diffusers", "-", "diffusers folder, fp32"),
            ("diffusers", tmp / "diffusers", "-", "diffusers folder, fp32"),
            ("ours", tmp / "official.safetensors", "-", "official keys, safetensors, fp32"),
            ("ours", tmp / "official.pth", "-", "official .pth, fp32"),
            ("ours", tmp / "bf16", "float32", "bf16 folder loaded as fp32"),
            ("diffusers", tmp / "bf16", "float32", "bf16 folder loaded as fp32"),
        ]
        print(f"machine: {machine()}; model {args.preset}")
        for impl, path, dtype, label in cases:
            out = subprocess.run([sys.executable, __file__, "--one", impl, str(path), dtype], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{impl:10s} {label:36s} weights {gib(r['weights'])}  peak over base {gib(r['peak_over_base'])} "
                  f"({r['peak_over_base'] / r['weights']:.2f}x)  resident after {gib(r['resident_over_base'])}  {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
