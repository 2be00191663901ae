"""The trainer never loses a good checkpoint and never executes one (issue 14 §1).

Resume reads only this run's checkpoints, without running code, and falls back past broken
ones; non-finite steps update nothing and a diverging run stops with its last good checkpoint
intact; one run per output folder; every option is checked before anything is loaded; data
loading is bounded in memory and reports what it leaves out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sana import load_dit
from sana.errors import SanaCheckpointError, SanaInputError, SanaNonFiniteError
from test_trainer import _config, world  # noqa: F401  (the shared tiny cache fixture)
from trainer import dit_step
from trainer.train_dcae import DCAETrainConfig, train_dcae
from trainer.train_dit import train_dit


def _state(folder: Path, step: int) -> dict:
    """A checkpoint's state (numpy's array globals allowed, so states of earlier versions load too)."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    with torch.serialization.safe_globals([reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]):
        return torch.load(folder / "checkpoints" / f"step_{step:07d}" / "state.pt", weights_only=True)


def _same_weights(a: Path, b: Path) -> bool:
    left, right = load_dit(a).state_dict(), load_dit(b).state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory) -> Path:  # noqa: F811
    """A finished 4-step run, saved at steps 2 and 4 (its checkpoints, exports and log)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_dit(_config(world, out, steps=4, save_every=2))
    return out


def _printed(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


# --------------------------------------------------------------------------------------------
# Resume runs no code and reads only the run folder
# --------------------------------------------------------------------------------------------


class _Planted:
    """Unpickling this runs `open(path, "w")`: the stand-in for code planted in a checkpoint."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_planted_state_is_never_executed(world, finished, tmp_path, capsys):  # noqa: F811
    run = _copy(finished, tmp_path)
    marker = tmp_path / "code_ran"
    planted = _state(run, 4)
    planted["config"] = _Planted(marker)
    torch.save(planted, run / "checkpoints" / "step_0000004" / "state.pt")
    train_dit(_config(world, run, steps=4, save_every=2))
    assert not marker.exists()
    err = _printed(capsys)
    assert "step_0000004" in err and "Unsupported global: GLOBAL io.open" in err  # reported, then the older checkpoint resumed
    assert f"resumed from {run / 'checkpoints' / 'step_0000002'} at step 2" in err
    assert _same_weights(run / "transformer", finished / "transformer")


def test_checkpoints_hold_plain_data_only(finished):
    state = torch.load(finished / "checkpoints" / "step_0000004" / "state.pt", weights_only=True)  # no allowlist
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor) and len(state["rng"]["python"]["internal"]) == 625


def test_a_state_written_by_the_previous_version_still_resumes(world, finished, tmp_path, capsys):  # noqa: F811
    """Its numpy RNG state is an ndarray: read with an allowlist of exactly numpy's array globals."""
    run = _copy(finished, tmp_path)
    state = _state(run, 4)
    numpy_rng = np.random.RandomState(7).get_state()
    state["rng"]["numpy"] = numpy_rng
    state["rng"]["python"] = (3, tuple(range(624)) + (624,), None)
    torch.save(state, run / "checkpoints" / "step_0000004" / "state.pt")
    train_dit(_config(world, run, steps=4, save_every=2))
    assert "resumed from" in _printed(capsys)
    assert np.array_equal(np.random.get_state()[1], numpy_rng[1])


def test_latest_pointer_and_links_cannot_lead_out_of_the_run_folder(world, finished, tmp_path, capsys):  # noqa: F811
    run = _copy(finished, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(run / "checkpoints" / "step_0000002", outside / "step_0000002")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"name": "../../outside/step_0000002", "step": 2}))
    (run / "checkpoints" / "step_0000009").symlink_to(outside / "step_0000002", target_is_directory=True)
    train_dit(_config(world, run, steps=4, save_every=2))
    err = _printed(capsys)
    assert f"resumed from {run / 'checkpoints' / 'step_0000004'} at step 4" in err
    assert "leads out of the run folder" in err and "not a checkpoint folder of this run" in err


# --------------------------------------------------------------------------------------------
# Broken checkpoints and logs: fall back, say so, never restart silently
# --------------------------------------------------------------------------------------------


def test_a_truncated_latest_state_falls_back_to_the_previous_checkpoint(world, finished, tmp_path, capsys):  # noqa: F811
    run = _copy(finished, tmp_path)
    state_file = run / "checkpoints" / "step_0000004" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    train_dit(_config(world, run, steps=4, save_every=2))
    err = _printed(capsys)
    assert f"cannot resume {run / 'checkpoints' / 'step_0000004'}" in err and "resumed from" in err
    # Steps 3-4 recomputed from step 2 reproduce the uninterrupted run, and its log.
    assert _same_weights(run / "transformer", finished / "transformer")
    assert (run / "loss.jsonl").read_text() != "" and _state(run, 4)["step"] == 4
    steps = [json.loads(line)["step"] for line in (run / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_partial_last_log_line_is_dropped_on_resume(world, finished, tmp_path, capsys):  # noqa: F811
    run = _copy(finished, tmp_path)
    with open(run / "loss.jsonl", "a") as log:
        log.write('{"step": 5, "lo')
    train_dit(_config(world, run, steps=4, save_every=2))
    assert "dropped 1 unreadable line" in _printed(capsys)
    rows = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]


def test_a_latest_pointer_to_a_deleted_checkpoint_falls_back_or_refuses(world, finished, tmp_path, capsys):  # noqa: F811
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    train_dit(_config(world, run, steps=4, save_every=2))
    err = _printed(capsys)
    assert "names step_0000004, which is missing" in err
    assert f"resumed from {run / 'checkpoints' / 'step_0000002'} at step 2" in err

    gone = _copy(finished, tmp_path, "gone")
    exported = (gone / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    for folder in (gone / "checkpoints").glob("step_*"):
        shutil.rmtree(folder)
    with pytest.raises(SanaCheckpointError, match="no intact checkpoint.*another --output-dir"):
        train_dit(_config(world, gone, steps=4, save_every=2))
    shutil.rmtree(gone / "checkpoints")  # latest.json too: the exports still tell of an earlier run
    with pytest.raises(SanaCheckpointError, match="exported weights of an earlier run.*another --output-dir"):
        train_dit(_config(world, gone, steps=4, save_every=2))
    assert (gone / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == exported


def test_resume_refuses_options_that_change_the_run_and_reports_harmless_ones(world, finished, tmp_path, capsys):  # noqa: F811
    run = _copy(finished, tmp_path)
    with pytest.raises(SanaInputError, match=r"--batch-size 4 \(checkpoint\) → 8 \(now\).*--lr 0\.002 \(checkpoint\) → 0\.001"):
        train_dit(_config(world, run, steps=4, save_every=2, batch_size=8, lr=1e-3))
    train_dit(_config(world, run, steps=4, save_every=2, log_every=2))
    assert "--log-every 1 (checkpoint) → 2 (now)" in _printed(capsys)
    with pytest.raises(SanaCheckpointError, match="--resume false would overwrite"):
        train_dit(_config(world, run, steps=4, save_every=2, resume=False))


# --------------------------------------------------------------------------------------------
# Non-finite steps
# --------------------------------------------------------------------------------------------


def test_a_non_finite_loss_skips_its_step(world, tmp_path, monkeypatch):  # noqa: F811
    """Step 3's loss is NaN: its weights, optimizer state, EMA and LR schedule stay those of step 2."""
    calls = []
    real_loss = dit_step.flow_matching_loss

    def loss_nan_at_step_3(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(dit_step, "flow_matching_loss", loss_nan_at_step_3)
    run = tmp_path / "run"
    summary = train_dit(_config(world, run, steps=4, save_every=1, keep_checkpoints=0))
    before, skipped, after = _state(run, 2), _state(run, 3), _state(run, 4)
    for key, value in before["model"].items():
        assert torch.equal(skipped["model"][key], value), key
    assert any(not torch.equal(after["model"][k], v) for k, v in before["model"].items())  # step 4 trained again
    for key, value in before["ema"]["shadow"].items():
        assert torch.equal(skipped["ema"]["shadow"][key], value), key
    moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(before["optimizer"]["state"].values(), skipped["optimizer"]["state"].values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)
    assert skipped["scheduler"]["last_epoch"] == before["scheduler"]["last_epoch"] == 2
    rows = {row["step"]: row for row in map(json.loads, (run / "loss.jsonl").read_text().splitlines())}
    assert rows[3]["skipped"] == "non-finite loss" and rows[3]["loss"] is None and rows[4]["loss"] > 0
    assert summary["skipped_steps"] == 1 and summary["step"] == 4


def test_a_diverging_run_stops_with_its_last_good_checkpoint_intact(world, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    config = _config(world, run, steps=40, lr=10.0, grad_clip=0.0, warmup_steps=0, save_every=1, keep_checkpoints=2,
                     max_nan_losses=3)
    with pytest.raises(SanaNonFiniteError, match=r"step \d+") as error:
        train_dit(config)
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["name"]
    assert latest in str(error.value)
    kept = sorted((run / "checkpoints").glob("step_*"))
    assert kept and all(
        all(bool(t.isfinite().all()) for t in torch.load(f / "state.pt", weights_only=True)["model"].values()) for f in kept
    )
    for export in ("transformer", "transformer_ema"):
        assert all(bool(t.isfinite().all()) for t in load_dit(run / export).state_dict().values()), export


AGREE_WORKER = """
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.distributed import World
from trainer.dit_step import skip_reason

rank, init_file, results = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
world = World(rank=rank, size=2, local_rank=rank, device=torch.device("cpu"))
scaler = torch.amp.GradScaler("cpu", enabled=True)
# Only rank 1 sees a NaN loss; rank 0's loss and gradients are finite.
reason = skip_reason(float("nan") if rank else 1.0, 1.0, scaler, world)
Path(results, f"rank{rank}").write_text(str(reason))
dist.destroy_process_group()
"""


def test_all_ranks_agree_on_skipping_a_step(tmp_path):
    """A non-finite value on one rank makes every rank skip, for the same (counted) reason."""
    script = tmp_path / "worker.py"
    script.write_text(AGREE_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "init"), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()  # a rank left waiting for a peer that failed
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["non-finite loss"] * 2


# --------------------------------------------------------------------------------------------
# One run per output folder
# --------------------------------------------------------------------------------------------


def test_a_second_run_into_the_same_folder_is_refused(world, tmp_path):  # noqa: F811
    from trainer.run_folder import run_lock

    run = tmp_path / "run"
    with run_lock(run):  # the first run, still going
        with pytest.raises(SanaCheckpointError, match=f"in use by another training run.*{os.getpid()}"):
            train_dit(_config(world, run, steps=1))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # refused before writing anything
    # The lock file a crashed run leaves behind holds no lock: the next run proceeds.
    (run / ".lock").write_text('{"pid": 999999999, "host": "elsewhere"}')
    assert train_dit(_config(world, run, steps=1))["step"] == 1


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


BAD_DIT_OPTIONS = [
    ({"grad_accum": 0}, "--grad-accum"),
    ({"grad_accum": -1}, "--grad-accum"),
    ({"log_every": 0}, "--log-every"),
    ({"steps": -5}, "--steps"),
    ({"steps": "ten"}, "--steps"),
    ({"batch_size": 0}, "--batch-size"),
    ({"batch_size": 3, "grad_accum": 2}, "--batch-size"),
    ({"betas": [0.9]}, "--betas"),
    ({"betas": [0.9, 1.5]}, "--betas"),
    ({"lr": 0.0}, "--lr"),
    ({"lr": float("nan")}, "--lr"),
    ({"eps": 0.0}, "--eps"),
    ({"weight_decay": -0.1}, "--weight-decay"),
    ({"warmup_steps": -1}, "--warmup-steps"),
    ({"grad_clip": -1.0}, "--grad-clip"),
    ({"ema_decay": 1.0}, "--ema-decay"),
    ({"ema_decay": -0.5}, "--ema-decay"),
    ({"caption_dropout": 1.5}, "--caption-dropout"),
    ({"logit_std": 0.0}, "--logit-std"),
    ({"flow_shift": -1.0}, "--flow-shift"),
    ({"seed": -1}, "--seed"),
    ({"save_every": -1}, "--save-every"),
    ({"keep_checkpoints": -1}, "--keep-checkpoints"),
    ({"sample_steps": 0}, "--sample-steps"),
    ({"max_nan_losses": 0}, "--max-nan-losses"),
    ({"lora_rank": -1}, "--lora-rank"),
    ({"lora_rank": 4, "distributed": "fsdp"}, "--lora-rank"),
    ({"mixed_precision": "fp8"}, "--mixed-precision"),
    ({"device": "tpu"}, "--device"),
    ({"model": ""}, "--init"),
    ({"model": "no-such-preset"}, "--model"),
    ({"init": "missing.safetensors", "model": ""}, "--init"),
    ({"vae": "missing-vae"}, "--vae"),
    ({"cache_dir": ""}, "--cache-dir"),
]


@pytest.mark.parametrize(("changes", "option"), BAD_DIT_OPTIONS, ids=[str(c) for c, _ in BAD_DIT_OPTIONS])
def test_every_dit_option_is_checked_before_anything_is_loaded(world, tmp_path, changes, option):  # noqa: F811
    # A cache folder that does not exist: loading anything before the check would fail differently.
    config = _config(world, tmp_path / "run", cache_dir=str(tmp_path / "no-cache"))
    for name, value in changes.items():
        setattr(config, name, value)
    with pytest.raises(SanaInputError, match=option):
        train_dit(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_an_input_error(world, tmp_path):  # noqa: F811
    with pytest.raises(SanaInputError, match="--device 'cuda': CUDA is not available"):
        train_dit(_config(world, tmp_path / "run", device="cuda"))


def test_a_batch_no_latent_size_can_fill_is_refused_before_the_model_is_built(world, tmp_path):  # noqa: F811
    with pytest.raises(SanaInputError, match="--batch-size 64"):
        train_dit(_config(world, tmp_path / "run", batch_size=64))


BAD_DCAE_OPTIONS = [
    ({"steps": 0}, "--steps"),
    ({"batch_size": 0}, "--batch-size"),
    ({"resolution": 0}, "--resolution"),
    ({"lr": -1.0}, "--lr"),
    ({"warmup_steps": -1}, "--warmup-steps"),
    ({"grad_clip": -0.5}, "--grad-clip"),
    ({"log_every": 0}, "--log-every"),
    ({"l1_weight": 0.0, "mse_weight": 0.0}, "--l1-weight"),
    ({"salient_weight": -1.0}, "--salient-weight"),
    ({"phase": "encoder"}, "--phase"),
    ({"config_json": ""}, "--init"),
    ({"data": ""}, "--data"),
    ({"data": "missing-folder"}, "--data"),
]


@pytest.mark.parametrize(("changes", "option"), BAD_DCAE_OPTIONS, ids=[str(c) for c, _ in BAD_DCAE_OPTIONS])
def test_every_dcae_option_is_checked_before_anything_is_loaded(world, tmp_path, changes, option):  # noqa: F811
    from trainer.tiny_models import tiny_dcae_config

    base = {"output_dir": str(tmp_path / "run"), "config_json": str(tmp_path / "arch.json"), "data": str(world["data"]),
            "steps": 2, "batch_size": 2, "resolution": 32, "progress": False}
    (tmp_path / "arch.json").write_text(tiny_dcae_config(latent_channels=8, widths=(8, 16, 16, 32)).to_json())
    with pytest.raises(SanaInputError, match=option):
        train_dcae(DCAETrainConfig(**{**base, **changes}))
    assert not (tmp_path / "run").exists()


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from trainer.__main__ import main

    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("argv", "option"), [
    (["--grad-accum", "0"], "--grad-accum"),
    (["--log-every", "0"], "--log-every"),
    (["--steps", "-5"], "--steps"),
    (["--betas", "0.9"], "--betas"),
    (["--ema-decay", "1.5"], "--ema-decay"),
])
def test_dit_cli_ends_bad_options_with_one_error_line(world, tmp_path, capsys, argv, option):  # noqa: F811
    status, _, err = _cli(capsys, "dit", "--cache-dir", str(world["cache"]), "--model", str(world["arch"]),
                          "--output-dir", str(tmp_path / "run"), "--progress", "false", *argv)
    assert status == 2 and option in _one_error_line(err)


def test_config_files_and_preset_overrides_report_errors(world, tmp_path, capsys):  # noqa: F811
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"steps": 2, "stepz": 3}))
    broken = tmp_path / "broken.json"
    broken.write_text("{steps: 2")
    status, _, err = _cli(capsys, "dit", "--config", str(unknown), "--cache-dir", str(world["cache"]))
    assert status == 2 and "stepz" in _one_error_line(err)
    status, _, err = _cli(capsys, "dit", "--config", str(broken))
    assert status == 2 and str(broken) in _one_error_line(err)
    status, _, err = _cli(capsys, "preset", "--output-dir", str(tmp_path / "model"), "--set", "dit_training.steps=ten")
    assert status == 2 and "--set 'dit_training.steps=ten'" in _one_error_line(err)
    assert not (tmp_path / "model").exists()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _cache_cli(capsys, world, data: Path, cache: Path, *extra: str):  # noqa: F811
    return _cli(capsys, "cache", "--data", str(data), "--cache-dir", str(cache), "--vae", str(world["vae"]),
                "--text-encoder", str(world["root"] / "text_encoder"), "--resolution", "32", "--max-length", "32", *extra)


def test_cache_cli_refuses_bad_sizes_and_an_empty_folder(world, tmp_path, capsys):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    for option in ("--resolution", "--shard-size", "--batch-size"):
        status, _, err = _cache_cli(capsys, world, world["data"], tmp_path / "cache", option, "0")
        assert status == 2 and option in _one_error_line(err)
    status, _, err = _cache_cli(capsys, world, empty, tmp_path / "cache")
    assert status == 2 and str(empty) in _one_error_line(err)
    assert not (tmp_path / "cache").exists()


def test_images_without_a_usable_caption_are_counted_and_reported(world, tmp_path, capsys):  # noqa: F811
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(data / f"{name}.png")
    (data / "a.txt").write_text("a red circle\n")
    (data / "c.txt").write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    with pytest.warns(UserWarning, match="without a caption"):
        status, out, _ = _cache_cli(capsys, world, data, tmp_path / "cache")
    assert status == 0
    printed = json.loads(out)
    assert printed["samples"] == 1 and printed["without_caption_count"] == 1 and printed["bad_caption_count"] == 1
    summary = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert summary["without_caption"] == [str(data / "b.png")] and summary["bad_caption"] == [str(data / "c.txt")]


class _SizeSpy:
    """Records the element count of every tensor made from an array and of every interpolation's
    input and output: the float intermediates of preparing an image."""

    def __init__(self, monkeypatch):
        self.largest = 0
        from_numpy, interpolate = torch.from_numpy, torch.nn.functional.interpolate

        def spy_from_numpy(array):
            self.largest = max(self.largest, array.size)
            return from_numpy(array)

        def spy_interpolate(tensor, *args, **kwargs):
            result = interpolate(tensor, *args, **kwargs)
            self.largest = max(self.largest, tensor.numel(), result.numel())
            return result

        monkeypatch.setattr(torch, "from_numpy", spy_from_numpy)
        monkeypatch.setattr(torch.nn.functional, "interpolate", spy_interpolate)


def test_image_memory_is_bounded_by_the_target_size(tmp_path, monkeypatch):
    """A 10×10000 image (and a 2000×2000 one) at a 64 px target: no intermediate holds more than
    twice the bin per side (the old path scaled to cover first: 32×32000 floats)."""
    from PIL import Image

    from trainer.data import bucket_table, closest_bin, to_bucket

    table = bucket_table(64, 8)
    for height, width in ((10, 10000), (2000, 2000)):
        image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        bin_height, bin_width = closest_bin(height, width, table)
        spy = _SizeSpy(monkeypatch)
        pixels = to_bucket(image, table)
        assert pixels.shape == (3, bin_height, bin_width) and pixels.abs().max() <= 1
        assert 0 < spy.largest <= 3 * (2 * bin_height) * (2 * bin_width), (height, width, spy.largest)
        monkeypatch.undo()

        from trainer.data import load_fitted

        Image.fromarray(image).save(tmp_path / "big.png")
        spy = _SizeSpy(monkeypatch)
        assert torch.equal(load_fitted(tmp_path / "big.png", table), pixels)
        assert spy.largest <= 3 * (2 * bin_height) * (2 * bin_width)
        monkeypatch.undo()


def test_every_unusable_image_is_skipped(tmp_path, monkeypatch):
    from PIL import Image

    from trainer.data import bucket_table, load_fitted

    table = bucket_table(64, 8)
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "bomb.png")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 96, 3), 200, np.uint8)).save(good)
    good.with_name("truncated.jpg").write_bytes(good.read_bytes()[:200])
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").convert("P").save(tmp_path / "palette.png")
    assert load_fitted(good, table) is not None and load_fitted(tmp_path / "palette.png", table).shape[0] == 3
    assert load_fitted(tmp_path / "truncated.jpg", table) is None and load_fitted(tmp_path / "missing.png", table) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100×100 > 2 × the limit: a decompression bomb
    assert load_fitted(tmp_path / "bomb.png", table) is None
