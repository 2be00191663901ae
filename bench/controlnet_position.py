"""The ControlNet demo's figure: where the shapes land on held-out scenes, with vs without control.

    HF_HUB_OFFLINE=1 python bench/controlnet_position.py                          # train (or reuse) and score
    HF_HUB_OFFLINE=1 python bench/controlnet_position.py --out-dir runs/controlnet-demo --seeds 4

Runs `python -m trainer controlnet-demo` (`trainer.controlnet_demo`: a ControlNet for the shipped
shapes-tiny model, trained on the CPU on edge maps with position-free captions; a folder of an
earlier run with the same options is reused) and prints the machine, the load average, the
stage timings, and the shapes evaluator's scores on the held-out scenes prompted without
position words, generated without and with each scene's edge map. With `--seeds` other than the
run's, the trained ControlNet is scored again over that many seeds. A bench figure, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine  # noqa: E402
from trainer.distributed import set_cpu_threads  # noqa: E402
from trainer.controlnet_demo import DemoOptions, evaluate_control, run_controlnet_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/controlnet-demo")
    parser.add_argument("--seeds", type=int, default=None, help="score over this many seeds (default: the run's)")
    parser.add_argument("--steps", type=int, default=DemoOptions.steps, help="training steps")
    parser.add_argument("--lr", type=float, default=DemoOptions.lr)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the CPUs this process may use; on a busy "
                        "machine 1 avoids oversubscription)")
    args = parser.parse_args()
    threads = set_cpu_threads(args.threads)
    result = run_controlnet_demo(args.out_dir, DemoOptions(steps=args.steps, lr=args.lr), progress=False, threads=threads)
    if args.seeds is not None and args.seeds != result["seeds"]:
        result.update(evaluate_control(result["options"]["model"], result["controlnet"], seeds=args.seeds))
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}; {threads} thread(s)")
    print(f"timings (s): {result['timings_s']}; final training loss {result['final_loss']:.4f}")
    print(f"held-out scenes: {result['held_out_scenes']} ({result['single_object_scenes']} single-object) x {result['seeds']} seeds, "
          f"{result['steps']} steps, CFG {result['guidance_scale']}")
    print("| | position | colour | shape | count |\n|---|---|---|---|---|")
    for name in ("without_control", "with_control"):
        s = result[name]
        print(f"| {name.replace('_', ' ')} | {s['position']:.3f} | {s['colour']:.3f} | {s['shape']:.3f} | {s['count']:.3f} |")


if __name__ == "__main__":
    main()
