"""Batch mode across processes and interruptions (issue 20), with the embedded shapes-tiny model:

- `torchrun` with 2 gloo ranks on the CPU writes the same PNG files and the same index.jsonl,
  byte for byte, as 1 rank: 12 items in two sizes, 4 batches of 4, 3, 4 and 1 items, so rank 0
  makes 8 images and rank 1 makes 4. The batches do not depend on the world size, so this is
  the same computation (same shapes, OMP_NUM_THREADS=1 in both) and exact equality holds; only
  rank 0 draws the progress bar and prints the summary.
- a run killed mid-way (SIGKILL, no chance to clean up) leaves only complete PNGs, and the rerun
  completes the set without touching what was done.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from sana.errors import SanaCheckpointError
from sana.png import read_png_text
from sana.provenance import read_record

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "shapes-tiny"
MODELS = ["--dit", str(SHIPPED / "transformer"), "--vae", str(SHIPPED / "vae"), "--text-encoder", str(SHIPPED / "text_encoder")]

pytestmark = pytest.mark.skipif(not (SHIPPED / "transformer").is_dir(), reason="shipped model absent")


def _environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SANA_CACHE_DIR": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}


def _items(path: Path) -> Path:
    """12 items: 7 at 32x32 (the defaults), 5 at 64x32; two with their own seed."""
    entries = [{"prompt": f"{colour} {shape}"} for colour in ("a red", "a blue", "a green") for shape in ("circle", "square", "star", "triangle")]
    for i in (2, 5, 8, 10, 11):
        entries[i]["width"] = 64
    entries[3]["seed"] = 2**64 - 1
    entries[8]["seed"] = 7
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def _torchrun(nproc: int, prompts: Path, out: Path, logs: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run ... -m sana generate --prompts`, each rank's output in `logs`.
    A launch in which a rank died of a signal is run once more, with a warning (as the trainer's
    torchrun tests do: on 2 shared cores a gloo process has rarely aborted at exit); the rerun
    resumes, which is itself what batch mode promises."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--log-dir", str(logs), "--redirects", "3", "-m", "sana", "generate", *MODELS, "--prompts", str(prompts),
               "--out-dir", str(out), "--steps", "2", "--width", "32", "--height", "32", "--batch-size", "4", "--seed", "100",
               "--device", "cpu"]
    run = subprocess.run(command, env=_environment(tmp_path), capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and re.search(r"exitcode\s*:\s*-(6|11)\b", run.stderr):
        warnings.warn(f"torchrun: a rank died of a signal; running the launch once more.\n{run.stderr[-3000:]}", stacklevel=2)
        run = subprocess.run(command, env=_environment(tmp_path), capture_output=True, text=True, timeout=600)
    return run


def _rank_log(logs: Path, rank: int) -> str:
    found = sorted(logs.glob(f"**/attempt_*/{rank}/stderr.log"))
    assert found, list(logs.rglob("*"))
    return found[-1].read_text()


def _failure(run: subprocess.CompletedProcess, logs: Path) -> str:
    ranks = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(logs.rglob("stderr.log")))
    return f"{run.stderr[-2000:]}\n{ranks}"


def test_two_gloo_ranks_write_the_images_and_index_one_rank_writes(tmp_path):
    prompts = _items(tmp_path / "prompts.jsonl")
    one = _torchrun(1, prompts, tmp_path / "one", tmp_path / "logs1", tmp_path)
    assert one.returncode == 0, _failure(one, tmp_path / "logs1")
    two = _torchrun(2, prompts, tmp_path / "two", tmp_path / "logs2", tmp_path)
    assert two.returncode == 0, _failure(two, tmp_path / "logs2")

    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == [f"{i:06d}.png" for i in range(12)] + ["index.jsonl"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files
    for name in files:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    index = [json.loads(line) for line in (tmp_path / "one" / "index.jsonl").read_text().splitlines()]
    assert [e["seed"] for e in index] == [100, 101, 102, 2**64 - 1, 104, 105, 106, 107, 7, 109, 110, 111]
    assert all(e["status"] == "ok" for e in index)
    assert read_record(tmp_path / "two" / "000002.png")["request"]["width"] == 64

    main, other = _rank_log(tmp_path / "logs2", 0), _rank_log(tmp_path / "logs2", 1)
    assert "12 items: 0 already done, 0 cannot be made, 12 to generate on 2 process(es)" in main
    assert "done 12, skipped 0 (already there), failed 0" in main and "images/s on 2 process(es)" in main
    assert "12/12" in main  # the one bar counts every rank's images
    assert "images:" not in other and "done 12" not in other


def test_a_killed_run_resumes_without_redoing_finished_items_or_leaving_a_partial_file(tmp_path):
    prompts = _items(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sana", "generate", *MODELS, "--prompts", str(prompts), "--out-dir", str(out),
               "--steps", "6", "--width", "64", "--height", "64", "--batch-size", "1", "--device", "cpu"]
    env = _environment(tmp_path)
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while len(list(out.glob("*.png"))) < 3:
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no third image within 300 s"
            time.sleep(0.01)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        first.stderr.close()
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert 3 <= len(done) < 12, sorted(done)  # killed mid-way
    for name in done:
        read_png_text(out / name)  # complete: a killed write leaves only a hidden temporary
    leftovers = [p.name for p in out.iterdir() if p.name not in done]
    assert all(re.fullmatch(r"\.\d{6}\.png\.\d+\.\w{8}\.tmp", name) for name in leftovers), leftovers

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"done {12 - len(done)}, skipped {len(done)} (already there), failed 0" in second.stderr
    for name, stamp in done.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp, name  # not redone
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(12)]
    for name in pngs:
        try:
            read_png_text(out / name)
        except SanaCheckpointError as error:
            pytest.fail(str(error))
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [e["status"] for e in index] == ["ok"] * 12
