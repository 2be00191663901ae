"""A training run's folder: one run at a time, checkpoints confined to it, resume that runs no
code and never silently starts over.

Layout under `output_dir`:
  .lock                                one running process holds it (the OS lets go when it dies)
  checkpoints/step_NNNNNNN/state.pt    resumable state: tensors and plain data only
  checkpoints/latest.json              {"name": "step_NNNNNNN", "step": N}: the newest saved checkpoint
  loss.jsonl                           one JSON row per logged step

Every path read on resume is a `step_N` folder of this run's `checkpoints/` (names are checked,
symbolic links may not lead out of the run folder), and `state.pt` is read with
`sana.checkpoint.load_torch_data`, which executes nothing. A checkpoint that cannot be read is
reported and the next older one is tried; a folder whose checkpoints are all unreadable is an
error, never a silent restart from step 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sana.checkpoint import load_torch_data, write_bytes, write_json, write_torch
from sana.errors import SanaCheckpointError

LOCK_NAME = ".lock"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE = "state.pt"
CHECKPOINT_NAME = re.compile(r"step_(\d{7,})")
STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "ema", "rng", "step", "data_position", "config")

Report = Callable[[str], None]


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


# --------------------------------------------------------------------------------------------
# One run per folder
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_lock(folder: Path, *, take: bool = True) -> Iterator[None]:
    """Hold `folder`'s lock for the block, or raise `SanaCheckpointError` naming the run holding it.

    An OS file lock (flock; msvcrt on Windows) on `folder/.lock`, which holds the owner's pid and
    host for the message: a run that crashes, or is killed, releases it with its process, so no
    stale lock is ever left behind. `take=False` (non-main ranks under torchrun) does nothing."""
    if not take:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    # "a+": opening must not erase the owner's pid before we know we are the owner.
    with open(path, "a+", encoding="utf-8") as handle:
        if not _try_lock(handle):
            handle.seek(0)
            owner = "owner unknown"
            with contextlib.suppress(OSError):  # Windows: the owner's locked byte cannot be read
                owner = handle.read().strip() or owner
            raise SanaCheckpointError(
                f"{folder} is in use by another training run ({owner}; lock {path}): two runs in one output folder "
                "would overwrite each other's checkpoints and log rows. Wait for it to end, or give another --output-dir"
            )
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
            handle.flush()
            yield
        finally:
            _unlock(handle)


def _try_lock(handle) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as error:  # a file system without locks (some network mounts): run unguarded
        print(f"warning: cannot lock {handle.name} ({error}); make sure no other run uses this folder", file=sys.stderr)
    return True


def _unlock(handle) -> None:
    with contextlib.suppress(OSError):
        if os.name == "nt":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symbolic link followed, lies in `root`."""
    return path.resolve().is_relative_to(root.resolve())


def list_checkpoints(out: Path, report: Report = lambda message: None) -> list[tuple[int, Path]]:
    """(step, folder) of this run's `checkpoints/step_N` folders, oldest first; a folder whose
    links lead out of the run folder is reported and left out."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    if not _inside(folder, out):
        report(f"warning: {folder} leads out of the run folder ({folder.resolve()}): its checkpoints are ignored")
        return []
    found = []
    for entry in folder.iterdir():
        match = CHECKPOINT_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir():
            continue
        if not _inside(entry, out):
            report(f"warning: {entry} leads out of the run folder ({entry.resolve()}): ignored")
            continue
        found.append((int(match[1]), entry))
    return sorted(found)


def _latest_step(out: Path, steps: set[int], report: Report) -> int | None:
    """The step `latest.json` names, when it names one of `steps`; any other content is reported."""
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["name"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        report(f"warning: {pointer} is unreadable ({error}); using the newest intact checkpoint")
        return None
    match = CHECKPOINT_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        report(f"warning: {pointer} names {name!r}, not a checkpoint folder of this run (step_NNNNNNN): ignored")
        return None
    if int(match[1]) not in steps:
        report(f"warning: {pointer} names {name}, which is missing (deleted?); using the newest intact checkpoint")
        return None
    return int(match[1])


def load_state(folder: Path, step: int, out: Path) -> dict:
    """The resumable state in `folder/state.pt`, checked: loaded without running code, every
    expected entry present, its step the folder's, the model weights finite."""
    path = folder / STATE
    if not path.is_file():
        raise SanaCheckpointError(f"{path}: missing")
    if not _inside(path, out):
        raise SanaCheckpointError(f"{path}: leads out of the run folder ({path.resolve()})")
    state = load_torch_data(path, numpy_rng=True)  # states before plain-data RNG held np.random.get_state()
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise SanaCheckpointError(f"{path}: not a trainer state (expected the entries {list(STATE_KEYS)}, found {found})")
    if state["step"] != step:
        raise SanaCheckpointError(f"{path}: holds step {state['step']!r}, but its folder is step {step}")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise SanaCheckpointError(f"{path}: 'model' is not a dict of tensors")
    broken = [name for name, t in weights.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        raise SanaCheckpointError(f"{path}: non-finite weights in {broken[:5]}")
    return state


@dataclass(frozen=True)
class Resumable:
    """A checkpoint to resume: its folder and its loaded, checked state."""

    path: Path
    state: dict


def find_resumable(out: Path, report: Report) -> Resumable | None:
    """The newest intact checkpoint of the run in `out` (at most the step `latest.json` names;
    broken ones are reported and skipped), or None for a folder that never saved one.

    Raises `SanaCheckpointError` when the run saved checkpoints but none can be resumed:
    starting over there would overwrite its exports and log."""
    checkpoints = list_checkpoints(out, report)
    latest = _latest_step(out, {step for step, _ in checkpoints}, report)
    candidates = [(step, path) for step, path in reversed(checkpoints) if latest is None or step <= latest]
    for step, path in candidates:
        try:
            return Resumable(path, load_state(path, step, out))
        except SanaCheckpointError as error:
            report(f"warning: cannot resume {path}: {error}; trying an older checkpoint")
    if checkpoints or (out / CHECKPOINTS / LATEST).exists():
        tried = ", ".join(path.name for _, path in candidates) or "none left"
        raise SanaCheckpointError(
            f"{out} holds an earlier run but no intact checkpoint to resume (tried: {tried}); "
            "starting over here would overwrite its exports and log: give another --output-dir to start a new run"
        )
    return None


def refuse_fresh_start(out: Path) -> None:
    """`--resume false` into a folder holding checkpoints would overwrite and prune them: refuse."""
    checkpoints = list_checkpoints(out)
    if checkpoints:
        raise SanaCheckpointError(
            f"{out} holds checkpoints of an earlier run (newest: {checkpoints[-1][1].name}); --resume false would "
            "overwrite them: resume it (--resume true), or give another --output-dir to start a new run"
        )


def save_state(out: Path, state: dict) -> Path:
    """Write `state` as the checkpoint of its step and point `latest.json` at it; returns the folder."""
    folder = out / CHECKPOINTS / checkpoint_name(state["step"])
    write_torch(folder / STATE, state)
    write_json(out / CHECKPOINTS / LATEST, {"name": folder.name, "step": state["step"]})
    return folder


def prune_checkpoints(out: Path, keep: int, newest: int) -> None:
    """Delete the oldest checkpoints before step `newest`, keeping `keep` in all (0: keep all).
    Later ones (left by a run resumed from an earlier step) are the resumed run's to overwrite."""
    if keep <= 0:
        return
    older = [path for step, path in list_checkpoints(out) if step < newest and not path.is_symlink()]
    for path in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loss log
# --------------------------------------------------------------------------------------------


def truncate_log(path: Path, step: int, report: Report) -> None:
    """Keep the log rows up to `step` (later ones will be recomputed); lines that are not a JSON
    row with a step (a run killed mid-write) are reported and dropped."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept, unreadable = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line + "\n")
    if unreadable:
        report(f"warning: {path}: dropped {unreadable} unreadable line(s) (a run interrupted while writing?)")
    if "".join(kept) != text:
        write_bytes(path, "".join(kept).encode("utf-8"))
