"""Where a training run's numbers and pictures go: `loss.jsonl` always; TensorBoard
(`torch.utils.tensorboard`, needs the `tensorboard` package) and Weights & Biases (`wandb`) as
`--report-to` says, each an optional dependency imported only when used.

Logged per row: loss, learning rate, gradient norm, throughput (samples and steps per second over
the row's steps), the run's cumulative seconds (continued across resumes); sample grids as
images. A resumed run continues the same TensorBoard run (events after the checkpoint's step are
dropped) and the same W&B run (its id is kept in the run folder).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np

from sana.checkpoint import write_bytes
from sana.errors import SanaInputError

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend → the package it needs
WANDB_ID = "wandb_run_id.txt"
TENSORBOARD_DIR = "tensorboard"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def chosen_backends(report_to: str) -> list[str]:
    """The backends `--report-to` asks for; "auto" is TensorBoard when it is installed."""
    if report_to == "auto":
        return ["tensorboard"] if installed("tensorboard") else []
    if report_to == "none":
        return []
    return list(BACKENDS) if report_to == "all" else [report_to]


def check_report_to(report_to: str) -> None:
    """`SanaInputError` naming `--report-to` when it asks for a backend that is not installed."""
    if report_to not in ("auto", "none", "all", *BACKENDS):
        raise SanaInputError(f"--report-to {report_to!r}: expected auto, tensorboard, wandb, all or none")
    missing = [BACKENDS[b] for b in chosen_backends(report_to) if not installed(BACKENDS[b])]
    if missing:
        raise SanaInputError(f"--report-to {report_to}: needs the {' and '.join(missing)} package(s), not installed "
                             f"(pip install {' '.join(missing)}), or --report-to none")


class Reporter:
    """Writes the rows and images of one run (the main rank's; other ranks get `enabled=False`)."""

    def __init__(self, out: Path, report_to: str, *, config: dict, start_step: int, project: str = "sana-trainer",
                 enabled: bool = True):
        self.out, self.enabled = out, enabled
        self.tensorboard = self.wandb = None
        self._last = (start_step, time.monotonic())
        if not enabled:
            return
        backends = chosen_backends(report_to)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a crashed run logged after its last checkpoint (steps
            # after `start_step`, which this run logs again).
            self.tensorboard = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
            if not start_step:
                self.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        if "wandb" in backends:
            self.wandb = _start_wandb(out, config, project)

    def log(self, step: int, row: dict, samples_per_step: int) -> dict:
        """Append `row` (plus throughput since the last row) to loss.jsonl and the backends; returns it."""
        previous_step, previous_time = self._last
        now = time.monotonic()
        self._last = (step, now)
        elapsed = now - previous_time
        if elapsed > 0 and step > previous_step:
            row = {**row, "samples_per_second": round((step - previous_step) * samples_per_step / elapsed, 3),
                   "steps_per_second": round((step - previous_step) / elapsed, 4)}
        if not self.enabled:
            return row
        with open(self.out / "loss.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k not in ("step", "epoch") and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        return row

    def image(self, step: int, tag: str, grid: np.ndarray) -> None:
        """A uint8 [H, W, 3] picture (a sample grid) at `step`."""
        if not self.enabled:
            return
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, grid, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(grid)}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(out: Path, config: dict, project: str):
    """A W&B run, resumed when this run folder already started one."""
    import wandb

    id_file = out / WANDB_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    run = wandb.init(project=project, id=run_id, resume="allow", dir=str(out), config=config, name=out.name)
    if not id_file.is_file():
        write_bytes(id_file, (run_id + "\n").encode())
    return run
