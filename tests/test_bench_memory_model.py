"""`bench/memory_model.py`: its live-bytes counter is exact on a known sequence, and the script runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory_model import LiveBytes  # noqa: E402


def test_live_bytes_counts_creations_views_and_frees():
    weight = torch.zeros(256, device="meta")  # resident: never counted
    with torch.no_grad(), LiveBytes([weight]) as mode:
        a = weight + 1  # 1 KiB
        b = a * 2  # 2 KiB live
        del a  # 1 KiB
        view = b.view(16, 16)  # same storage: nothing new
        b.add_(1)  # in place: nothing new
        c = torch.cat([b, weight])  # 2 KiB more: 3 KiB, the peak
        del c, b
        live_with_view = mode.live  # the view keeps b's storage alive
        del view
    assert mode.peak == 3 * 1024
    assert live_with_view == 1024
    assert mode.live == 0


def test_script_models_a_generation():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory_model.py"), "--dit", "sana-600m-1024", "--size", "1024"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "modelled peak" in proc.stdout and "denoise" in proc.stdout, proc.stdout
