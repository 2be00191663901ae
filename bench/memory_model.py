"""Peak device memory of a whole `sana.generate` call, modelled on the meta device (no GPU needed).

    python bench/memory_model.py                                  # Sana-1.6B 4K, bf16, CFG: the 16 GB question
    python bench/memory_model.py --dit sana-600m-1024 --size 1024

The model itself is `sana.memory_plan` (what each stage counts, and what a model cannot see);
`python -m sana doctor` prints the same plan next to the kernel report. Compare with
`bench/gpu.py` on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import gib  # noqa: E402
from sana.memory_plan import LiveBytes, plan_generation_memory  # noqa: E402, F401 (LiveBytes: tests)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default="sana-1600m-4k", help="a DIT_PRESETS name")
    p.add_argument("--size", type=int, default=4096, help="image side in pixels")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=1, help="images per call (CFG doubles it in the DiT)")
    p.add_argument("--device-gib", type=float, default=16.0, help="the device's memory, for the DC-AE's tiling plan")
    args = p.parse_args()

    plan = plan_generation_memory(args.dit, args.size, args.size, dtype=DTYPES[args.dtype], batch=args.batch,
                                  device_bytes=int(args.device_gib * 2**30))
    weights, activations = plan.weights, plan.activations
    print(f"{args.dit} at {args.size}², {args.dtype}, batch {args.batch} with CFG; modelled on the meta device")
    print(f"weights: DiT {gib(weights['dit'])}, Gemma-2-2B {gib(weights['text_encoder'])}, DC-AE {gib(weights['dcae'])}")
    print(f"activations: encode +{gib(activations['encode'])}, one denoising step +{gib(activations['denoise'])}, "
          f"decode +{gib(activations['decode'])} (tiling plan under a {args.device_gib:g} GiB device: {plan.tiling})")
    for name, total in plan.stages.items():
        print(f"  {name:8s} {gib(total)}")
    print(f"modelled peak {gib(plan.peak)} ({plan.peak_stage}); {'within' if plan.fits else 'over'} {args.device_gib:g} GiB")


if __name__ == "__main__":
    main()
