"""W8A8 (int8 weights and activations) vs the float DiT: quality, weight memory, and GPU speed.

    python bench/w8a8.py quality                  # CPU: velocity rel. L2 per sampling step, random Sana-0.6B
    python bench/w8a8.py memory                   # weight bytes of the blocks, bf16 vs W8A8 (meta tensors)
    python bench/w8a8.py shapes                   # PSNR + prompt adherence of the embedded shapes model
    python bench/w8a8.py speed                    # GPU: DiT forward time and peak memory, bf16 vs W8A8
    python bench/w8a8.py speed --kernels-check    # GPU: also the Triton kernels against their references

quality: a random-weight DiT (seed 0, the library's init) samples with Flow-DPM-Solver and CFG
4.5 from random caption embeddings (300 tokens, 40 valid; the unconditional branch 8 valid). At
every step the float model's trajectory point is also given to the W8A8 model, and the relative
L2 error ‖v_w8a8 − v_float‖ / ‖v_float‖ of the raw velocity (both CFG branches) and of the guided
velocity is printed. A separate W8A8 trajectory from the same noise gives the end-latent error.
`--dtype fp32` (default) on the CPU: the float reference is then exact float arithmetic and the
error is the quantization's alone (bf16 matmuls on CPU are slow and add their own rounding);
`--dtype bf16 --device cuda` measures against our bf16 model on a GPU.

speed: Sana-1600M (random weights, bf16) at 1024² (32² latents) and 4096² (128² latents, the 4K
model's PE), CFG batch 2, 300 caption tokens with 40 valid. The bf16 model runs first, then it is
quantized in place and the W8A8 model runs (Triton kernels: SANA_KERNELS=auto on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import current_bytes, gib, machine, peak_bytes, reset_peak, sync, time_it  # noqa: E402

import sana  # noqa: E402
from sana.quant import block_weight_bytes, quantize_w8a8  # noqa: E402
from sana.quant import DEFAULT_KEEP  # noqa: E402
from sana.samplers import flow_dpm_solver, guided_velocity  # noqa: E402
from sana.schedules import flow_dpm_schedule  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CAPTION_TOKENS = 300


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


def caption_inputs(batch: int, caption_channels: int, valid: list[int], device, dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, CAPTION_TOKENS, caption_channels, generator=g).to(device, dtype)
    mask = torch.zeros(batch, CAPTION_TOKENS, device=device)
    for row, n in enumerate(valid):
        mask[row, :n] = 1
    return context, mask


# --------------------------------------------------------------------------------------------
# Quality


def run_quality(args: argparse.Namespace) -> None:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_grad_enabled(False)
    cfg = sana.DIT_PRESETS[args.preset]
    torch.manual_seed(0)
    float_model = sana.SanaDiT(cfg).to(device, dtype).eval()
    w8a8_model = quantize_w8a8(float_model)
    side = args.latent
    noise = torch.randn(1, cfg.in_channels, side, side, generator=torch.Generator().manual_seed(2)).to(device)
    # CFG order of sana.samplers.guided_velocity: unconditional first, then conditional.
    context, mask = caption_inputs(2, cfg.caption_channels, [8, 40], device, dtype)
    schedule = flow_dpm_schedule(args.steps, cfg.flow_shift)
    raw_errors: list[float] = []
    guided_errors: list[float] = []

    def batched(model):
        return lambda x, t: model(x.to(dtype), t, context, mask)

    w8a8_velocity = guided_velocity(batched(w8a8_model), guidance_scale=4.5)

    def compared(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in, t_in = torch.cat([x, x]), t.repeat(2)
        v_float = float_model(x_in.to(dtype), t_in, context, mask)
        v_w8a8 = w8a8_model(x_in.to(dtype), t_in, context, mask)
        raw_errors.append(relative_l2(v_w8a8, v_float))
        guided = lambda v: v.float().chunk(2)[0] + 4.5 * (v.float().chunk(2)[1] - v.float().chunk(2)[0])  # noqa: E731
        guided_errors.append(relative_l2(guided(v_w8a8), guided(v_float)))
        step = len(raw_errors)
        print(f"  step {step:2d}  t={float(t[0]):7.1f}  raw velocity rel. L2 {raw_errors[-1] * 100:.2f}%  "
              f"guided {guided_errors[-1] * 100:.2f}%", flush=True)
        return guided(v_float)

    print(f"machine: {machine()}")
    print(f"quality: {args.preset} random weights (seed 0), {args.dtype} reference on {device}, latent {side}² "
          f"({side * 32}px), Flow-DPM-Solver {args.steps} steps, CFG 4.5")
    end_float = flow_dpm_solver(compared, noise.clone(), schedule)
    end_w8a8 = flow_dpm_solver(w8a8_velocity, noise.clone(), schedule) if args.trajectory else None
    print(f"max per-step raw velocity rel. L2: {max(raw_errors) * 100:.2f}% (mean {sum(raw_errors) / len(raw_errors) * 100:.2f}%)")
    print(f"max per-step guided velocity rel. L2: {max(guided_errors) * 100:.2f}%")
    if end_w8a8 is not None:
        print(f"end latents of separate trajectories: rel. L2 {relative_l2(end_w8a8, end_float) * 100:.2f}%")


# --------------------------------------------------------------------------------------------
# Memory


def run_memory(args: argparse.Namespace) -> None:
    print("memory: weight bytes of the DiT blocks (parameters + buffers), bf16 vs W8A8 (default keep/weight_only)")
    for preset in ("sana-600m-1024", "sana-1600m-1024"):
        with torch.device("meta"):
            model = sana.SanaDiT(sana.DIT_PRESETS[preset]).to(torch.bfloat16)
        bf16 = block_weight_bytes(model)
        paper = block_weight_bytes(quantize_w8a8(model, keep=(*sana.quant.DEFAULT_KEEP, "blocks.*.cross_attn.kv_linear")))
        default = block_weight_bytes(quantize_w8a8(model))
        print(f"  {preset}: bf16 {gib(bf16)}; W8A8 {gib(default)} = {default / bf16 * 100:.1f}% "
              f"(K/V projection kept bf16 as in the paper: {paper / bf16 * 100:.1f}%)")


# --------------------------------------------------------------------------------------------
# Shapes model: PSNR and prompt adherence


def psnr(a, b) -> float:
    mse = float(((torch.as_tensor(a).float() - torch.as_tensor(b).float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def attributes_asked(scene) -> tuple[str, ...]:
    """The evaluator's verdicts that apply to `scene` (position only for one object)."""
    return ("colour", "shape", "count") + (("position",) if scene.count == 1 else ())


def psnr_summary(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    below = sorted(v for v in values if v < 30)
    return (f"mean {sum(finite) / max(len(finite), 1):.1f} dB, min {min(values):.1f} dB "
            f"({len(values) - len(finite)} identical; {len(below)} below 30 dB"
            f"{': ' + ', '.join(f'{v:.1f}' for v in below) if below else ''})")


def run_shapes(args: argparse.Namespace) -> None:
    from trainer import shapes
    from trainer.shapes_model import SHIPPED_MODEL_DIR, ShapesModel

    folder = Path(args.shapes_model) if args.shapes_model else SHIPPED_MODEL_DIR
    if not (folder / "transformer").is_dir():
        print(f"shapes: no model folder at {folder} (build it with `python -m trainer --preset shapes-tiny`)")
        return
    torch.set_grad_enabled(False)
    model = ShapesModel.load(folder)
    keep = (*DEFAULT_KEEP, *args.keep)
    quantized = dataclasses.replace(model, dit=quantize_w8a8(model.dit, keep=keep))
    # The yardstick: the same DiT cast to bf16, a perturbation nobody calls a quality loss. Seeds
    # whose image moves most under bf16 are the ones sitting on a boundary between two outcomes.
    bf16 = dataclasses.replace(model, dit=copy.deepcopy(model.dit).to(torch.bfloat16))
    scenes = shapes.held_out_scenes()
    prompts = [shapes.caption(s) for s in scenes]
    float_images, w8a8_images, bf16_images, targets, seeds = [], [], [], [], []
    for seed in range(args.seeds):
        float_images += model(prompts, seed=seed, steps=args.steps)
        w8a8_images += quantized(prompts, seed=seed, steps=args.steps)
        bf16_images += bf16(prompts, seed=seed, steps=args.steps)
        targets += scenes
        seeds += [seed] * len(scenes)
    w8a8_psnr = [psnr(a, b) for a, b in zip(w8a8_images, float_images)]
    bf16_psnr = [psnr(a, b) for a, b in zip(bf16_images, float_images)]
    # One evaluator verdict per image, reused below: analysing an image is the costly part.
    float_found = [shapes.evaluate([image], [scene]) for image, scene in zip(float_images, targets)]
    w8a8_found = [shapes.evaluate([image], [scene]) for image, scene in zip(w8a8_images, targets)]
    right = [all(getattr(found, name) == 1 for name in attributes_asked(scene))
             for found, scene in zip(float_found, targets)]
    print(f"shapes: {folder}, {len(w8a8_psnr)} images ({len(prompts)} held-out prompts × {args.seeds} seeds), "
          f"{args.steps} steps; kept in float: {', '.join(keep)}")
    print(f"  PSNR W8A8 vs float: {psnr_summary(w8a8_psnr)}")
    print(f"  PSNR bf16 DiT vs float (yardstick): {psnr_summary(bf16_psnr)}")
    print(f"  PSNR W8A8 vs float over the {sum(right)} images the float model draws right: "
          f"{psnr_summary([v for v, ok in zip(w8a8_psnr, right) if ok])}")
    lowest = sorted(range(len(w8a8_psnr)), key=w8a8_psnr.__getitem__)[:5]
    for i in lowest:
        print(f"    lowest: seed {seeds[i]} {shapes.caption(targets[i])!r}: W8A8 {w8a8_psnr[i]:.1f} dB, "
              f"bf16 {bf16_psnr[i]:.1f} dB (rank {sorted(bf16_psnr).index(bf16_psnr[i]) + 1} of {len(bf16_psnr)}); "
              f"float image {'right' if right[i] else 'wrong'}")
    for name, images in (("float", float_images), ("W8A8", w8a8_images), ("bf16", bf16_images)):
        print(f"  adherence {name}: {shapes.evaluate(images, targets).to_dict()}")
    # Paired view: the same seed and prompt through both models, so a score gap is the images that
    # changed verdict, not two independent samples.
    for name in ("colour", "shape", "position", "count"):
        lost = gained = 0
        for a, b, scene in zip(float_found, w8a8_found, targets):
            if name not in attributes_asked(scene):
                continue
            right_float, right_w8a8 = getattr(a, name) == 1, getattr(b, name) == 1
            lost += right_float and not right_w8a8
            gained += right_w8a8 and not right_float
        print(f"  {name}: {lost} images right in float but not in W8A8, {gained} the other way")


# --------------------------------------------------------------------------------------------
# GPU speed


def check_kernels(device: torch.device, dry_run: bool = False) -> None:
    """The Triton kernels against their PyTorch references at SANA-1600M sizes, on the GPU
    (a dry run: small sizes on CPU under TRITON_INTERPRET=1)."""
    from sana.quant import ops, triton_ops

    def steps(got, want) -> str:
        diff = (got[0].int() - want[0].int()).abs()
        return f"max int8 step difference {int(diff.max())} ({int((diff > 0).sum())} of {diff.numel()} values)"

    g = torch.Generator(device=device).manual_seed(0)
    M, C, H = (2 * 16 + 7, 64, 96) if dry_run else (2 * 4096 + 7, 2240, 5600)
    tokens = (M - 7) // 2
    x = torch.randn(M, C, device=device, generator=g).to(torch.bfloat16)
    print(f"  quantize_rows: {steps(triton_ops.quantize_rows(x), ops.quantize_rows_reference(x))}")
    side = 8 if dry_run else 64  # a 2048² image's latent map: 64 × 64 tokens
    y = torch.randn(2, side * side, 2 * H, device=device, generator=g).to(torch.bfloat16)
    dw_weight = (torch.randn(2 * H, 1, 3, 3, device=device, generator=g) / 3).to(torch.bfloat16)
    dw_bias = torch.randn(2 * H, device=device, generator=g).to(torch.bfloat16)
    print("  depthwise_conv_glu_quantize: " + steps(
        [t.reshape(-1) for t in triton_ops.depthwise_conv_glu_quantize(y, dw_weight, dw_bias, side, side)],
        [t.reshape(-1) for t in ops.depthwise_conv_glu_quantize_reference(y, dw_weight, dw_bias, side, side)],
    ))
    t_mod = torch.randn(2, 6, C, device=device, generator=g).to(torch.bfloat16)
    xb = x[: 2 * tokens].view(2, tokens, C)
    print("  layernorm_modulate_quantize: " + steps(
        triton_ops.layernorm_modulate_quantize(xb, t_mod[:, 0], t_mod[:, 1], 1e-6),
        ops.layernorm_modulate_quantize_reference(xb, t_mod[:, 0], t_mod[:, 1], 1e-6),
    ))
    a, a_s = ops.quantize_rows_reference(x)
    w, w_s = ops.quantize_weight(torch.randn(3 * C, C, device=device, generator=g))
    bias = torch.randn(3 * C, device=device, generator=g).to(torch.bfloat16)
    got = triton_ops.int8_linear(a, a_s, w, w_s, bias, torch.float32)
    want = ops.int8_linear_reference(a, a_s, w, w_s, bias, torch.float32)
    print(f"  int8_linear: rel. L2 vs reference {relative_l2(got, want):.2e}")
    w_bf16 = w.to(torch.bfloat16)
    for name, fn in (("bf16 matmul", lambda: torch.nn.functional.linear(x, w_bf16, bias)),
                     ("int8 GEMM + epilogue", lambda: triton_ops.int8_linear(a, a_s, w, w_s, bias, torch.bfloat16))):
        median, _ = time_it(fn, device, 1 if dry_run else 20, warmup=0 if dry_run else 3)
        print(f"  {name} [{M}x{C}] x [{C}x{3 * C}]: {median * 1e3:.3f} ms ({2 * M * C * 3 * C / median / 1e12:.0f} TFLOP/s)")


# A dry run's DiT: the 1.6B block structure at a width a 2-core CPU runs in seconds.
DRY_RUN_DIT = dict(hidden_size=64, depth=2, attention_head_dim=32, cross_attention_heads=2, cross_attention_head_dim=32,
                   caption_channels=48)


def run_speed(args: argparse.Namespace) -> None:
    if args.dry_run:  # the same code path on CPU, tiny, fp32: checks the script, measures nothing
        device, dtype = torch.device("cpu"), torch.float32
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("speed: needs a CUDA GPU (the W8A8 speed-up comes from the Triton int8 GEMMs); --dry-run checks the script")
        return
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_grad_enabled(False)
    print(f"machine: {machine()}; SANA_KERNELS={os.environ.get('SANA_KERNELS', 'auto')}")
    if args.kernels_check:
        check_kernels(device, args.dry_run)
    for preset, side in (("sana-1600m-1024", 32), ("sana-1600m-4k", 128)):
        if args.only and side != args.only:
            continue
        cfg = sana.DIT_PRESETS[preset]
        if args.dry_run:
            cfg, side = cfg.replace(**DRY_RUN_DIT), side // 8
        torch.manual_seed(0)
        model = sana.SanaDiT(cfg).to(device, dtype).eval()
        x = torch.randn(args.batch, cfg.in_channels, side, side, device=device, dtype=dtype)
        t = torch.full((args.batch,), 999.0, device=device)
        context, mask = caption_inputs(args.batch, cfg.caption_channels, [40] * args.batch, device, dtype)
        results = {}
        outputs = {}
        for name in ("bf16", "w8a8"):
            if name == "w8a8":
                model = quantize_w8a8(model, inplace=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            sync(device)
            weights = current_bytes(device)
            outputs[name] = model(x, t, context, mask).float()  # also the autotuning / warm-up pass
            reset_peak(device)
            repeats = 1 if args.dry_run else args.repeats
            median, best = time_it(lambda: model(x, t, context, mask), device, repeats, warmup=0 if args.dry_run else 1)
            results[name] = (median, best, peak_bytes(device), weights, block_weight_bytes(model))
        print(f"{preset} latent {side}² ({side * 32}px), batch {args.batch}: output rel. L2 W8A8 vs bf16 "
              f"{relative_l2(outputs['w8a8'], outputs['bf16']) * 100:.2f}%")
        for name, (median, best, peak, weights, blocks) in results.items():
            print(f"  {name:5s} median {median * 1000:8.1f} ms  min {best * 1000:8.1f} ms  peak {gib(peak)}  "
                  f"weights {gib(weights)} (blocks {gib(blocks)})")
        print(f"  speed-up {results['bf16'][0] / results['w8a8'][0]:.2f}x")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality", "memory", "shapes", "speed"])
    p.add_argument("--preset", default="sana-600m-1024", help="quality: the DiT preset")
    p.add_argument("--latent", type=int, default=32, help="quality: latent side (32 = 1024px)")
    p.add_argument("--steps", type=int, default=10, help="quality/shapes: sampling steps")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="quality: the reference dtype")
    p.add_argument("--device", default="cpu", help="quality: device")
    p.add_argument("--trajectory", action="store_true", help="quality: also run a separate W8A8 trajectory")
    p.add_argument("--shapes-model", default=None, help="shapes: model folder (default: assets/shapes-tiny)")
    p.add_argument("--keep", action="append", default=[], help="shapes: one more fnmatch pattern of layers kept in float")
    p.add_argument("--seeds", type=int, default=32,
                   help="shapes: images per prompt (32: 1152 images, where one image is 0.09 points)")
    p.add_argument("--batch", type=int, default=2, help="speed: batch (2 = one CFG pair)")
    p.add_argument("--repeats", type=int, default=10, help="speed: timed forwards")
    p.add_argument("--only", type=int, default=None, help="speed: only this latent side (32 or 128)")
    p.add_argument("--kernels-check", action="store_true", help="speed: check the Triton kernels first")
    p.add_argument("--dry-run", action="store_true", help="speed: tiny model on CPU (Triton interpreted), checks the script")
    args = p.parse_args()
    {"quality": run_quality, "memory": run_memory, "shapes": run_shapes, "speed": run_speed}[args.what](args)


if __name__ == "__main__":
    main()
