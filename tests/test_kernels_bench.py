"""The GPU benches do not rot: their dry runs (tiny models on CPU) run end to end."""

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


def test_w8a8_speed_bench_dry_run():
    """`bench/w8a8.py speed` (GPU only for figures) runs its whole path on CPU, kernels check included."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "w8a8.py"), "speed", "--dry-run", "--kernels-check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for expected in ("int8_linear: rel. L2 vs reference", "sana-1600m-1024", "sana-1600m-4k", "speed-up"):
        assert expected in proc.stdout, proc.stdout
    assert "max int8 step difference 0 " in proc.stdout, proc.stdout  # the fused quantizers agree exactly here


def test_w8a8_shapes_bench_one_seed():
    """`bench/w8a8.py shapes` on the shipped model, one seed: W8A8 and the bf16 yardstick are both
    close to the float images (their means are ~47 and ~53 dB over 1152 images)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "w8a8.py"), "shapes", "--seeds", "1", "--steps", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    means = {}
    for line in proc.stdout.splitlines():
        if "PSNR" in line and "mean" in line:
            means[line.split(":")[0].strip()] = float(line.split("mean ")[1].split(" dB")[0])
    assert set(means) == {"PSNR W8A8 vs float", "PSNR bf16 DiT vs float (yardstick)",
                          next(k for k in means if k.startswith("PSNR W8A8 vs float over"))}, proc.stdout
    assert all(v > 35 for v in means.values()), means
    assert proc.stdout.count("lowest: seed 0") == 5 and "adherence bf16" in proc.stdout, proc.stdout


def test_dcae_upsample_bench_runs_small():
    """`bench/dcae_upsample.py` end to end at a tiny size: both variants agree to fp32 rounding."""
    cmd = [sys.executable, str(ROOT / "bench" / "dcae_upsample.py"), "--size", "128", "--width-divisor", "16",
           "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("folded") == 6, proc.stdout  # five layers and the decoder
    difference = float(proc.stdout.split("max rel. difference ")[1].split()[0])
    assert difference < 1e-5, proc.stdout
