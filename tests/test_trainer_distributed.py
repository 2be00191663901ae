"""torchrun with 2 gloo processes: identical weights on both ranks, equal to a 1-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sana import load_dit
from test_trainer import world  # noqa: F401  (the shared tiny cache fixture)

WORKER = """
import sys, torch
from trainer.train_dit import DiTTrainConfig, train_dit
from trainer.distributed import init_world
cfg = DiTTrainConfig(output_dir=sys.argv[1], cache_dir=sys.argv[2], model=sys.argv[3], steps=3, batch_size=4,
                     lr=2e-3, save_every=0, log_every=1, progress=False, ema_decay=0.9, seed=0)
model = train_dit(cfg)["model"]
world = init_world("cpu")
import torch.distributed as dist
if dist.is_initialized():
    # Gather every rank's in-memory weights: they must be identical, not just close.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world.size)]
    dist.all_gather(gathered, flat)
    if world.rank == 0:
        torch.save(gathered, sys.argv[1] + "/gathered.pt")
    dist.destroy_process_group()
"""


def _torchrun(nproc: int, out: Path, world, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), str(out), str(world["cache"]), str(world["arch"])]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_two_gloo_processes_match_one(world, tmp_path):  # noqa: F811
    two = _torchrun(2, tmp_path / "two", world, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _torchrun(1, tmp_path / "one", world, tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = torch.load(tmp_path / "two" / "gathered.pt")
    assert len(ranks) == 2 and torch.equal(ranks[0], ranks[1])
    a = load_dit(tmp_path / "one" / "transformer").state_dict()
    b = load_dit(tmp_path / "two" / "transformer").state_dict()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    moved = max(float((a[k] - c).abs().max()) for k, c in load_dit(tmp_path / "one" / "transformer_ema").state_dict().items())
    assert moved > 0
    loss_one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "loss.jsonl").read_text().splitlines()]
    loss_two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "loss.jsonl").read_text().splitlines()]
    assert loss_one == pytest.approx(loss_two, rel=1e-4)
