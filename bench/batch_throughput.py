"""Batch mode's throughput: images/s against `--batch-size`, with the embedded shapes-tiny model.

    HF_HUB_OFFLINE=1 python bench/batch_throughput.py                       # CPU, fp32
    HF_HUB_OFFLINE=1 python bench/batch_throughput.py --device cuda --dtype bf16 --items 256 --batch-sizes 1 8 32 64

Each batch size runs the loop of `python -m sana generate --prompts` (sana.batch: requests
resolved against the models, `make_batches`, `generate_batch` with one seed per item, the PNG
with its record written atomically) over the same items, after one warm-up batch, `--rounds`
times; the models load once, outside the figures. Printed per batch size, from the fastest
round: wall seconds, images/s, and CPU seconds per image (this process, all threads: the work
done, steadier than wall time on a shared CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine, sync  # noqa: E402
from sana import batch  # noqa: E402
from sana.provenance import describe_models, make_record  # noqa: E402

SHIPPED = ROOT / "assets" / "shapes-tiny"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")


def prompts(count: int) -> list[str]:
    """Prompts of the shapes world the model was trained on, cycling through colours and shapes."""
    return [f"a {COLOURS[i % 4]} {SHAPES[(i // 4) % 4]} at the {('top', 'bottom')[(i // 16) % 2]}" for i in range(count)]


def run_items(parts: batch.Parts, requests: dict, models: dict, batch_size: int, out: Path, device: torch.device) -> None:
    for indices in batch.make_batches(sorted(requests), requests, batch_size):
        images = batch.generate_batch(parts, [requests[i] for i in indices])
        for index, image in zip(indices, images):
            assert isinstance(image, torch.Tensor), image  # a failed item would spoil the figure
            batch.write_image(out / batch.output_name(index, len(requests)), image, make_record(requests[index], models))
    sync(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="DiT and text encoder (the DC-AE stays fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="pixels a side (128: the model's native size)")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per batch size; the fastest is printed")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 keeps idle OpenMP threads from spinning on a shared CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    paths = {"dit": str(SHIPPED / "transformer"), "vae": str(SHIPPED / "vae"), "text_encoder": str(SHIPPED / "text_encoder")}
    vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = batch.load_parts(paths, {"dit": dtype, "vae": vae_dtype, "text_encoder": dtype}, str(device))
    models = {c: {**m, "dtype": batch.dtype_names(parts)[c]} for c, m in describe_models(paths).items()}
    defaults = batch.Defaults(width=args.size, height=args.size, steps=args.steps)
    items = [batch.Item(i, i + 1, text) for i, text in enumerate(prompts(args.items))]
    requests = {
        item.index: batch.resolve_request(parts.dit, parts.dcae, prompt=item.prompt, seed=batch.item_seed(item, 0),
                                          defaults=defaults)
        for item in items
    }
    print(f"machine: {machine()}; device {device}, {args.dtype}; {args.items} items, {args.size}x{args.size} px, "
          f"{args.steps} steps {requests[0]['solver']}, CFG {requests[0]['guidance_scale']}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| batch size | wall s | images/s | CPU s / image |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.batch_sizes:
            warmup = {i: requests[i] for i in range(min(size, args.items))}
            run_items(parts, warmup, models, size, Path(folder), device)
            rounds = []
            for _ in range(args.rounds):
                wall, cpu = time.perf_counter(), time.process_time()
                run_items(parts, requests, models, size, Path(folder), device)
                rounds.append((time.perf_counter() - wall, time.process_time() - cpu))
            wall, cpu = min(rounds)
            print(f"| {size} | {wall:.2f} | {args.items / wall:.2f} | {cpu / args.items:.3f} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
