"""End-to-end text-to-image: ours (`sana.generate`) vs diffusers' `SanaPipeline` on the same weights.

    python bench/pipeline.py                          # reduced widths, 512x512, 20 steps, CFG, fp32 CPU
    python bench/pipeline.py --device cuda --dtype bf16 --full --size 1024 --rounds 3
    python bench/pipeline.py --device cuda --dtype bf16 --full --dit sana-1600m-4k --size 4096 --rounds 1

Reports seconds per image and, per stage (text encoding, denoising, DC-AE decode), the
stage's wall time and the peak memory inside it (CUDA: peak allocated; CPU: the process's
peak RSS, weights included). The stage boundaries are taken by wrapping the text encoder's
`encode` / the pipeline's `encode_prompt` and the DC-AE's `decode` with timers, so both sides
run their normal code path.

Random weights at two sizes: `--full` builds the released shapes (Gemma-2-2B, Sana-0.6B,
DC-AE f32c32), which needs a GPU to be practical; the default is reduced widths that a small
CPU runs in seconds (printed with the results). The tokenizer is trained offline on a small
corpus (`tests/tiny_gemma.py`), so token counts are close to, not equal to, Gemma's.

Every run is its own process (so peak memory is its own); implementations alternate, round
after round (ours, diffusers, ours, diffusers, ...), and the minimum over rounds is reported,
which damps the noise of a shared machine. Both sides start from the same seed, and the
largest pixel difference between their images is printed as a sanity check.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import gib, machine, peak_bytes, reset_peak, sync  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT = "A painting of a squirrel eating a burger, detailed, cinematic lighting"
STAGES = ("text", "denoise", "decode")

# Reduced widths for a CPU: the released block structure, narrower and shallower.
REDUCED_GEMMA = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=64)
REDUCED_DIT = dict(hidden_size=576, depth=8, cross_attention_heads=8, cross_attention_head_dim=72)
REDUCED_DCAE_WIDTHS = (32, 64, 128, 128, 256, 256)
# The released shapes (Gemma-2-2B; Sana-0.6B is the preset itself; DC-AE f32c32 is the default config).
FULL_GEMMA = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256)


# ---------------------------------------------------------------------------------------
# Weights


def build_weights(folder: Path, full: bool, sample_size: int, preset: str = "sana-600m-1024") -> dict[str, str]:
    """Random Gemma-2, DiT and DC-AE, each saved in the diffusers layout both sides read."""
    import sana
    from sana.dcae import DCAE, DCAEConfig
    from sana.dcae_io import save_dcae
    from tiny_gemma import build_tiny_gemma

    gemma = FULL_GEMMA if full else REDUCED_GEMMA
    build_tiny_gemma(folder / "text_encoder", **gemma)
    dit_config = sana.DIT_PRESETS[preset].replace(caption_channels=gemma["hidden_size"], sample_size=sample_size)
    if not full:
        dit_config = dit_config.replace(**REDUCED_DIT)
    torch.manual_seed(0)
    dit = sana.SanaDiT(dit_config)
    with torch.no_grad():  # spread the otherwise tiny adaLN tables so every block matters
        for name, p in dit.named_parameters():
            if "scale_shift_table" in name:
                p.normal_(0, 0.3)
    sana.save_dit(dit, folder / "transformer")
    dcae_config = DCAEConfig(name="bench")
    if not full:
        dcae_config = dcae_config.replace(encoder_widths=REDUCED_DCAE_WIDTHS, decoder_widths=REDUCED_DCAE_WIDTHS,
                                          attention_head_dim=32)
    torch.manual_seed(1)
    save_dcae(DCAE(dcae_config), folder / "vae")
    return {"text_encoder": str(folder / "text_encoder"), "transformer": str(folder / "transformer"), "vae": str(folder / "vae")}


def describe(weights: dict[str, str]) -> str:
    import sana
    from sana.dcae_io import load_dcae

    te_config = json.loads((Path(weights["text_encoder"]) / "config.json").read_text())
    dit = sana.load_dit(weights["transformer"])
    dcae = load_dcae(weights["vae"])
    d = dit.config
    return (
        f"Gemma-2 hidden {te_config['hidden_size']} x {te_config['num_hidden_layers']} layers; "
        f"DiT hidden {d.hidden_size} x depth {d.depth} ({sum(p.numel() for p in dit.parameters()) / 1e6:.0f}M params); "
        f"DC-AE widths {list(dcae.config.decoder_widths)} ({dcae.num_parameters() / 1e6:.0f}M params)"
    )


# ---------------------------------------------------------------------------------------
# One measured run (child process)


class StageClock:
    """Stage boundaries from wrapped calls: text ends when the last text-encoder call returns,
    decode spans the DC-AE decode, denoise is what lies between."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: dict[str, float] = {}
        self.peaks: dict[str, int] = {}

    def start(self) -> None:
        sync(self.device)
        reset_peak(self.device)
        self.marks = {"start": time.perf_counter()}

    def wrap_text(self, fn):
        def timed(*args, **kwargs):
            out = fn(*args, **kwargs)
            sync(self.device)
            self.marks["text_end"] = time.perf_counter()
            self.peaks["text"] = peak_bytes(self.device)
            reset_peak(self.device)
            return out

        return timed

    def wrap_decode(self, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            self.marks["decode_start"] = time.perf_counter()
            self.peaks["denoise"] = peak_bytes(self.device)
            reset_peak(self.device)
            out = fn(*args, **kwargs)
            sync(self.device)
            self.marks["decode_end"] = time.perf_counter()
            self.peaks["decode"] = peak_bytes(self.device)
            return out

        return timed

    def finish(self) -> dict:
        sync(self.device)
        end = time.perf_counter()
        m = self.marks
        seconds = {
            "text": m["text_end"] - m["start"],
            "denoise": m["decode_start"] - m["text_end"],
            "decode": m["decode_end"] - m["decode_start"],
        }
        return {"total_s": end - m["start"], "stage_s": seconds, "stage_peak_bytes": dict(self.peaks)}


def run_one(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    weights = json.loads(args.weights)
    clock = StageClock(device)
    torch.set_grad_enabled(False)
    if args.impl in ("ours", "ours-compiled"):
        import sana
        from sana.dcae_io import load_dcae
        from sana.pipeline import generate

        dit = sana.load_dit(weights["transformer"], dtype=dtype, device=device)
        dcae = load_dcae(weights["vae"], dtype=dtype, device=device)
        text_encoder = sana.load_text_encoder(weights["text_encoder"], dtype=dtype, device=device)
        text_encoder.encode = clock.wrap_text(text_encoder.encode)
        dcae.decode = clock.wrap_decode(dcae.decode)

        def run(steps: int) -> torch.Tensor:
            return generate(dit=dit, dcae=dcae, text_encoder=text_encoder, prompt=PROMPT, height=args.size,
                            width=args.size, steps=steps, guidance_scale=args.cfg, seed=0,
                            compile_model=args.impl == "ours-compiled")
    else:
        from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
        from transformers import AutoTokenizer, Gemma2Model

        pipe = SanaPipeline(
            tokenizer=AutoTokenizer.from_pretrained(weights["text_encoder"]),
            text_encoder=Gemma2Model.from_pretrained(weights["text_encoder"], dtype=dtype).eval(),
            vae=AutoencoderDC.from_pretrained(weights["vae"], torch_dtype=dtype).eval(),
            transformer=SanaTransformer2DModel.from_pretrained(weights["transformer"], torch_dtype=dtype).eval(),
            scheduler=DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
        ).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.encode_prompt = clock.wrap_text(pipe.encode_prompt)
        pipe.vae.decode = clock.wrap_decode(pipe.vae.decode)

        def run(steps: int) -> torch.Tensor:
            out = pipe(prompt=PROMPT, height=args.size, width=args.size, num_inference_steps=steps,
                       guidance_scale=args.cfg, generator=torch.Generator().manual_seed(0), output_type="pt").images
            return out.movedim(1, -1)

    # Warm-up: first-call allocations, kernel selection and (compiled) the compile and the CUDA-graph
    # recording, which needs a few calls, stay out of the figures.
    run(3 if args.impl == "ours-compiled" else 1)
    clock.start()
    images = run(args.steps)
    result = clock.finish()
    torch.save(images.float().cpu(), args.image_out)
    return result


# ---------------------------------------------------------------------------------------
# Driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (a resolution bin of the model)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per implementation; the minimum is reported")
    p.add_argument("--full", action="store_true", help="the released shapes instead of reduced widths")
    p.add_argument("--dit", default="sana-600m-1024", help="the DiT preset (e.g. sana-1600m-4k with --size 4096)")
    p.add_argument("--compile", action="store_true", help="also time ours with compile_model=True (ours-compiled)")
    p.add_argument("--impl", choices=["ours", "ours-compiled", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--image-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return

    sample_size = {512: 16, 1024: 32, 2048: 64, 4096: 128}.get(args.size, 32)
    with tempfile.TemporaryDirectory() as tmp:
        weights = build_weights(Path(tmp), args.full, sample_size, args.dit)
        sizes = describe(weights)
        impls = ("ours", "diffusers") + (("ours-compiled",) if args.compile else ())
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        images: dict[str, torch.Tensor] = {}
        failures: dict[str, str] = {}
        for _ in range(args.rounds):
            for impl in impls:
                image_out = Path(tmp) / f"{impl}.pt"
                cmd = [sys.executable, __file__, "--impl", impl, "--weights", json.dumps(weights), "--image-out",
                       str(image_out)]
                for name in ("size", "steps", "cfg", "dtype", "device"):
                    cmd += [f"--{name}", str(getattr(args, name))]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:  # e.g. out of memory: reported, and the other side still runs
                    failures[impl] = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
                    continue
                runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                images[impl] = torch.load(image_out)

    print(f"machine: {machine()}")
    print(f"models: {sizes}")
    print(f"request: {args.size}x{args.size}, {args.steps} steps Flow-DPM-Solver, CFG {args.cfg}, {args.dtype}, "
          f"{args.device}; min over {args.rounds} alternating runs each")
    header = f"{'':14s} {'s/image':>8s}" + "".join(f" {s + ' s':>10s} {s + ' peak':>13s}" for s in STAGES)
    print(header)
    best = {}
    for impl, results in runs.items():
        if not results:
            print(f"{impl:14s} failed: {failures.get(impl, '?')}")
            continue
        best[impl] = min(r["total_s"] for r in results)
        row = f"{impl:14s} {best[impl]:8.2f}"
        for stage in STAGES:
            seconds = min(r["stage_s"][stage] for r in results)
            peak = min(r["stage_peak_bytes"][stage] for r in results)
            row += f" {seconds:10.2f} {gib(peak):>13s}"
        print(row)
    peaks = {impl: max(max(r["stage_peak_bytes"].values()) for r in results) for impl, results in runs.items() if results}
    print("peak over the stages: " + ", ".join(f"{impl} {gib(peak)}" for impl, peak in peaks.items()))
    if "ours" in best and "diffusers" in best:
        diff = (images["ours"] - images["diffusers"]).abs().max().item()
        print(f"speed-up {best['diffusers'] / best['ours']:.2f}x; max |ours - diffusers| over the images {diff:.2e}")
    if "ours-compiled" in best and "diffusers" in best:
        compiled_diff = (images["ours-compiled"] - images["diffusers"]).abs().max().item()
        print(f"compiled: speed-up {best['diffusers'] / best['ours-compiled']:.2f}x; "
              f"max |ours-compiled - diffusers| {compiled_diff:.2e}")


if __name__ == "__main__":
    main()
