"""The DC-AE decoder's upsampling, folded (`sana.dcae.nearest_upsample_conv`) vs as written
(`conv3x3(nearest×2(x))` + the duplicating shortcut): per layer and over a whole decode.

    .venv/bin/python bench/dcae_upsample.py                       # CPU: layers at 1024², decoder A/B
    .venv/bin/python bench/dcae_upsample.py --device cuda --dtype bf16 --width-divisor 1 --size 4096

layers: each of the SANA f32c32 decoder's upsampling transitions (C_in → C_out at the output side
for an image of `--size`), channels-last, batch 1, both variants on the same weights.
decoder: one random-weight DC-AE (widths divided by `--width-divisor`) decodes the same latents
untiled with each variant, alternating, `--repeats` times; best times and the output difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, sync  # noqa: E402

from sana.dcae import (  # noqa: E402
    DCAE,
    DCAE_PRESETS,
    UpBlock,
    nearest_upsample_conv,
    nearest_upsample_conv_reference,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def run_layers(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    widths = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"].decoder_widths
    print(f"layers ({args.size}² image, full widths):")
    for stage in range(len(widths) - 1):
        c_in, c_out, side = widths[stage + 1], widths[stage], args.size >> (stage + 1)
        gen = torch.Generator().manual_seed(stage)
        x = torch.randn(1, c_in, side, side, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(c_out, c_in, 3, 3, generator=gen) / (3 * c_in**0.5)).to(device, dtype)
        bias = torch.randn(c_out, generator=gen).to(device, dtype)
        repeats = 4 * c_out // c_in
        with torch.inference_mode():
            folded = best_time(lambda: nearest_upsample_conv(x, weight, bias, repeats), device, args.repeats)
            written = best_time(lambda: nearest_upsample_conv_reference(x, weight, bias, repeats), device, args.repeats)
        print(f"  {c_in:5d} → {c_out:5d} at {2 * side}²: folded {folded * 1000:8.1f} ms, as written {written * 1000:8.1f} ms,"
              f" {written / folded:.2f}×")


def run_decoder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    base = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]
    config = base.replace(encoder_widths=tuple(w // args.width_divisor for w in base.encoder_widths),
                          decoder_widths=tuple(w // args.width_divisor for w in base.decoder_widths),
                          attention_head_dim=32)
    torch.manual_seed(0)
    model = DCAE(config).to(device, dtype).eval()
    latents = torch.randn(1, config.latent_channels, args.size // 32, args.size // 32, device=device, dtype=dtype)
    folded_forward = UpBlock.forward

    def written_forward(self: UpBlock, x: torch.Tensor) -> torch.Tensor:
        return nearest_upsample_conv_reference(x, self.conv.weight, self.conv.bias, self.repeats if self.shortcut else 0)

    times: dict[str, list[float]] = {"folded": [], "as written": []}
    outputs = {}
    try:
        with torch.inference_mode():
            for _ in range(args.repeats):
                for name, forward in (("folded", folded_forward), ("as written", written_forward)):
                    UpBlock.forward = forward
                    sync(device)
                    start = time.perf_counter()
                    outputs[name] = model.decode(latents, memory_budget=1 << 50).float()
                    sync(device)
                    times[name].append(time.perf_counter() - start)
    finally:
        UpBlock.forward = folded_forward
    folded, written = min(times["folded"]), min(times["as written"])
    difference = (outputs["folded"] - outputs["as written"]).abs().max() / outputs["as written"].abs().max()
    print(f"decoder (widths/{args.width_divisor}, {args.size}², untiled, best of {args.repeats}): folded {folded:.2f} s, "
          f"as written {written:.2f} s, {written / folded:.2f}×; max rel. difference {float(difference):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--size", type=int, default=1024, help="image side")
    parser.add_argument("--width-divisor", type=int, default=4, help="decoder: widths divided by this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-layers", action="store_true")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"# {machine()}, {args.device}, {args.dtype}")
    if not args.skip_layers:
        run_layers(args, device, dtype)
    run_decoder(args, device, dtype)


if __name__ == "__main__":
    main()
