"""Peak device memory of DiT training, modelled on the meta device for each memory option (no GPU needed).

    python bench/train_memory_model.py                      # Sana-1.6B at 1024px, batch 1, 2 and 4: the README's table
    python bench/train_memory_model.py --dit sana-600m-512 --resolution 512 --options lora-bf16 full-8bit

The model itself is `trainer.memory_plan` (what it counts, and what a model cannot see). A card
"fits" a batch when the modelled peak plus `--overhead-gib` (CUDA context, cuBLAS workspaces,
allocator slack) is within it. `bench/train_gpu.py` measures the same run on a CUDA machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.memory_plan import TrainingOptions, plan_training_memory  # noqa: E402

RANK = 32
OPTIONS = {
    "lora-fp32": TrainingOptions(lora_rank=RANK),
    "lora-bf16": TrainingOptions(lora_rank=RANK, weights_dtype="bf16"),
    "lora-bf16-ckpt": TrainingOptions(lora_rank=RANK, weights_dtype="bf16", grad_checkpointing=True),
    "full-fp32": TrainingOptions(),
    "full-fp32-ema-cpu": TrainingOptions(ema="cpu"),
    "full-bf16": TrainingOptions(weights_dtype="bf16", ema="cpu"),
    "full-bf16-ckpt": TrainingOptions(weights_dtype="bf16", ema="cpu", grad_checkpointing=True),
    "full-8bit": TrainingOptions(weights_dtype="bf16", optimizer="adamw8bit", ema="cpu"),
    "full-8bit-ckpt": TrainingOptions(weights_dtype="bf16", optimizer="adamw8bit", ema="cpu", grad_checkpointing=True),
    "full-fsdp-offload": TrainingOptions(weights_dtype="bf16", grad_checkpointing=True, fsdp_cpu_offload=True),
}
CARDS_GIB = (16, 24, 48, 80)


def fits(peaks: dict[int, float], card: float, overhead: float) -> str:
    """The largest modelled batch that fits `card` GiB, or "no"."""
    fitting = [batch for batch, peak in peaks.items() if peak + overhead <= card]
    return f"b{max(fitting)}" if fitting else "no"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default="sana-1600m-1024", help="a DIT_PRESETS name")
    p.add_argument("--resolution", type=int, default=1024, help="square training resolution in pixels")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="per-GPU batch sizes")
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS), help="option sets to model")
    p.add_argument("--overhead-gib", type=float, default=1.0, help="what the model cannot see, for the fits columns")
    args = p.parse_args()

    print(f"{args.dit} at {args.resolution}², caption 300 tokens, modelled on the meta device; "
          f"fits: modelled peak + {args.overhead_gib:g} GiB ≤ the card")
    header = " | ".join([f"batch {b} (GiB)" for b in args.batches] + [f"{c} GB" for c in CARDS_GIB])
    print(f"| `python -m trainer dit` options | {header} |")
    print("|---" * (1 + len(args.batches) + len(CARDS_GIB)) + "|")
    for name in args.options:
        options = OPTIONS[name]
        peaks = {batch: plan_training_memory(args.dit, args.resolution, batch, options).peak / 2**30 for batch in args.batches}
        cells = [f"{peaks[b]:.1f}" for b in args.batches] + [fits(peaks, c, args.overhead_gib) for c in CARDS_GIB]
        print(f"| `{options.flags()}` | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
