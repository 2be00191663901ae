"""`python -m sana doctor`: what runs on this machine, and whether a generation fits on it.

    python -m sana doctor                                   # the default device, Sana-1.6B at 1024²
    python -m sana doctor --model sana-1600m-4k --size 4096x4096 --batch 1
    python -m sana doctor --json                            # the same as data, for a bug report

Prints the device, the torch / Triton versions and the kernel backend (`SANA_KERNELS`); probes
every Triton kernel on the device (`sana.kernels.dispatch`: kernel against reference on small
random inputs) and prints each verdict with the timing choices saved by earlier runs; then the
modelled memory plan of one `generate` call (`sana.memory_plan`). On a device without Triton
kernels (CPU, Apple MPS) the references run and nothing is probed, unless `--probe` asks for it
(on the CPU under `TRITON_INTERPRET=1`, Triton's interpreter runs the kernels).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from .errors import SanaInputError
from .kernels import dispatch
from .memory_plan import MemoryPlan, check_plan_inputs, plan_generation_memory

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MODEL = "sana-1600m-1024"
DEFAULT_DEVICE_GIB = 16.0


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", torch.xpu.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_size(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" (or one number for a square) → (width, height)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        width, height = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        raise SanaInputError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024")
    return width, height


def device_memory(device: torch.device) -> int | None:
    """Total bytes of a GPU's memory, or None where torch cannot tell."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "xpu":
            return torch.xpu.get_device_properties(device).total_memory
    except Exception:  # a device whose properties cannot be read
        return None
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"DiT preset for the memory plan (default {DEFAULT_MODEL})")
    parser.add_argument("--size", default="1024x1024", help="image size WIDTHxHEIGHT for the memory plan")
    parser.add_argument("--batch", type=int, default=1, help="images per call for the memory plan")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype the kernels are probed in and the models planned in (default: bf16 on a GPU, fp32 on cpu)")
    parser.add_argument("--device", default=None, help="default: cuda, else xpu, else mps, else cpu")
    parser.add_argument("--device-gib", type=float, default=None,
                        help=f"device memory for the plan (default: the GPU's, else {DEFAULT_DEVICE_GIB:g})")
    parser.add_argument("--probe", action="store_true", help="probe the kernels even on a device auto leaves to the references")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    """The `doctor` command: checks its options, then probes and plans (see the module docstring)."""
    width, height = parse_size(args.size)
    check_plan_inputs(args.model, width, height, args.batch)
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError as error:
        raise SanaInputError(f"--device {args.device!r}: {error}") from None
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    probing = args.probe or device.type in dispatch.AUTO_DEVICE_TYPES
    report = dispatch.report(device, [dtype] if probing else [])
    memory = device_memory(device)
    device_bytes = int(args.device_gib * 2**30) if args.device_gib else memory or int(DEFAULT_DEVICE_GIB * 2**30)
    plan = plan_generation_memory(args.model, width, height, dtype=dtype, batch=args.batch, device_bytes=device_bytes)
    if args.json:
        print(json.dumps({"device": str(device), "probed": probing, "kernel_report": report, "memory_plan": plan_data(plan)},
                         indent=2, default=str))
    else:
        print("\n".join(describe(device, dtype, probing, report, plan)))
    return 0


def plan_data(plan: MemoryPlan) -> dict[str, Any]:
    return {"model": plan.preset, "width": plan.width, "height": plan.height, "dtype": str(plan.dtype),
            "batch": plan.batch, "device_bytes": plan.device_bytes, "weights": plan.weights,
            "activations": plan.activations, "stages": plan.stages, "tiling": list(plan.tiling),
            "peak": plan.peak, "peak_stage": plan.peak_stage, "fits": plan.fits}


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def describe(device: torch.device, dtype: torch.dtype, probing: bool, report: dict[str, Any], plan: MemoryPlan) -> list[str]:
    runtime = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"HIP {torch.version.hip}" if torch.version.hip else "no GPU runtime"
    entry = report["devices"].get(str(device), {})
    lines = [
        f"device: {entry.get('label', device)}",
        f"torch {report['torch']} ({runtime}); triton {report['triton']}",
        f"kernels: SANA_KERNELS={report['backend']}; auto uses Triton kernels on {', '.join(report['auto_device_types'])} "
        f"devices that pass their probe and time faster",
        f"kernel-choice cache: {entry.get('cache_file', report['cache_dir'])}",
        "",
    ]
    if probing:
        lines.append(f"kernels on {device} ({str(dtype).removeprefix('torch.')} probes; timing choices from earlier runs):")
    else:
        lines.append(f"kernels on {device}: the PyTorch references run (no Triton kernels under auto on {device.type}; "
                     "--probe to probe anyway)")
    for kernel in report["kernels"]:
        probes = [p for p in kernel["probes"] if p["device"] == str(device)]
        verdict = "; ".join(f"{p['status']}" + (f" ({p['cause']})" if p["cause"] else "") for p in probes) or "not probed"
        lines.append(f"  {kernel['name']:34s} {verdict}")
        for choice in kernel["choices"]:
            timing = (f"kernel {choice['kernel_ms']:.3f} ms, reference {choice['reference_ms']:.3f} ms"
                      if "kernel_ms" in choice else choice.get("note", ""))
            lines.append(f"      {choice['variant']} | shapes {choice['shapes']}: {choice['choice']} ({timing}; {choice['source']})")
    weights, stages = plan.weights, plan.stages
    lines += [
        "",
        f"memory plan: {plan.preset} at {plan.width}x{plan.height}, {str(plan.dtype).removeprefix('torch.')}, "
        f"batch {plan.batch} with CFG (modelled on the meta device)",
        f"  weights: DiT {gib(weights['dit'])}, Gemma-2-2B {gib(weights['text_encoder'])}, DC-AE {gib(weights['dcae'])}",
        *(f"  {name:8s} {gib(total)}" for name, total in stages.items()),
        f"  DC-AE tiling (images per chunk, tile side in latents, overlap): {plan.tiling}",
        f"  peak {gib(plan.peak)} ({plan.peak_stage}): {'within' if plan.fits else 'over'} the device's "
        f"{gib(plan.device_bytes)} (plus ~0.5 GiB of CUDA context and allocator slack the model cannot see)",
    ]
    return lines
