"""`bench/gpu.py` does not rot: its dry run (tiny models on CPU, ours vs diffusers) runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run(tmp_path):
    pytest.importorskip("diffusers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OUT": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--models", "0.6b", "--sizes", "1024",
           "--batches", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.split("summary")[-1]
    assert "DiT 0.6b 1024² b1" in summary and "DC-AE decode 1024²" in summary and "speed-up" in summary, proc.stdout
    assert (tmp_path / "gpu_bench.json").exists()
    assert "Error" not in proc.stdout and "OOM" not in proc.stdout, proc.stdout


def test_gpu_bench_help():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout
