"""The command-line defects met by a new user (issue 18 §5), each fixed: missing paths and bad
`--set` values end in one error line before any work, `pack` never replaces a folder unasked,
`evaluate --out-dir` makes its folder first, `dit --help` describes the command, `dcae --init`
keeps its scaling factor, `runs/` is ignored by git."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sana.errors import SanaInputError
from test_trainer import world  # noqa: F401  (the shared tiny models)
from test_trainer_safety import _cli, _one_error_line
from trainer.shapes_model import SHIPPED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
shipped = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "transformer").is_dir(), reason="shipped model absent")


@shipped
def test_pack_needs_an_out_folder_and_never_replaces_one_unasked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # no default --out: the shipped model is not the default target
        _cli(capsys, "pack", "--model", str(SHIPPED_MODEL_DIR))
    assert exit_info.value.code == 2
    out = tmp_path / "packed"
    assert _cli(capsys, "pack", "--model", str(SHIPPED_MODEL_DIR), "--out", str(out))[0] == 0
    status, _, err = _cli(capsys, "pack", "--model", str(SHIPPED_MODEL_DIR), "--out", str(out))
    assert status == 2 and "exists; give --overwrite" in _one_error_line(err)
    assert _cli(capsys, "pack", "--model", str(SHIPPED_MODEL_DIR), "--out", str(out), "--overwrite")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]  # no staging or previous copy left

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    status, _, err = _cli(capsys, "pack", "--model", str(SHIPPED_MODEL_DIR), "--out", str(mine), "--overwrite")
    assert status == 2 and "notes.txt, which a pack did not write" in _one_error_line(err)
    assert (mine / "notes.txt").read_text() == "keep me"

    status, _, err = _cli(capsys, "pack", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "new"))
    assert status == 2 and "not a model folder" in _one_error_line(err) and not (tmp_path / "new.partial").exists()


@pytest.mark.parametrize(("item", "message"), [
    ("dit_training.stepz=3", "'dit_training' has no key 'stepz'"),
    ('dit_training.steps="ten"', "expected a value like 2000"),
    ("data.side=1.5", "expected a value like 128"),
    ("dit_training.steps=0", "--set dit_training: --steps 0: must be ≥ 1"),
    ('dit_training.mixed_precision="fp8"', "--mixed-precision 'fp8': expected one of"),
    ("dcae_training.lr=-1", "--set dcae_training: --lr -1: must be > 0.0"),
    ("nosection.x=1", "has no section 'nosection'"),
])
def test_preset_set_values_are_checked_before_any_work(tmp_path, capsys, item, message):
    status, _, err = _cli(capsys, "preset", "--output-dir", str(tmp_path / "model"), "--set", item)
    assert status == 2 and message in _one_error_line(err)
    assert not (tmp_path / "model").exists()


def test_preset_refuses_a_folder_built_with_other_values(tmp_path):
    from trainer.preset import PRESET_FILE, load_preset, run_preset

    model = tmp_path / "model"
    (model / "text_encoder").mkdir(parents=True)
    (model / "text_encoder" / "config.json").write_text("{}")
    (model / PRESET_FILE).write_text(json.dumps(load_preset("shapes-tiny")))
    with pytest.raises(SanaInputError, match=r"already holds stages \(text_encoder\) built with other preset values "
                                             r"\(dit_training.steps: 2000 → 10\)"):
        run_preset("shapes-tiny", model, overrides={"dit_training.steps": 10}, progress=False)
    (model / PRESET_FILE).unlink()  # a folder of an earlier version: only a plain rerun continues it
    with pytest.raises(SanaInputError, match=r"dit_training.steps=10"):
        run_preset("shapes-tiny", model, overrides={"dit_training.steps": 10}, progress=False)


def test_preset_summary_keeps_the_timings_of_reused_stages(tmp_path):
    from trainer.preset import SUMMARY_FILE, _keep_earlier_timings

    (tmp_path / SUMMARY_FILE).write_text(json.dumps({"timings_s": {"dcae": 353.3, "dit": 165.3}}))
    kept = _keep_earlier_timings(tmp_path, {"dcae": 0.01, "dit": 0.02, "evaluation": 5.04}, ["dcae", "dit"])
    assert kept == {"dcae": 353.3, "dit": 165.3, "evaluation": 5.0}


@shipped
def test_evaluate_makes_its_out_dir_before_the_work(tmp_path, monkeypatch):
    from trainer import shapes
    from trainer.evaluate import evaluate_model
    from trainer.shapes_model import ShapesModel

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    loaded = []
    real_load = ShapesModel.load
    monkeypatch.setattr(ShapesModel, "load", classmethod(lambda cls, folder: loaded.append(folder) or real_load(folder)))
    with pytest.raises(SanaInputError, match="--out-dir .*a-file/results: cannot be made a folder"):
        evaluate_model(SHIPPED_MODEL_DIR, seeds=1, steps=2, out_dir=blocker / "results")
    assert not loaded  # refused before the model was loaded, let alone run
    result = evaluate_model(SHIPPED_MODEL_DIR, seeds=1, steps=2, scenes=shapes.held_out_scenes()[:2], out_dir=tmp_path / "new" / "dir")
    assert result["images"] == 2 and (tmp_path / "new" / "dir" / "evaluation_grid.png").is_file()


def test_help_describes_the_commands_not_their_dataclasses(capsys):
    from trainer.__main__ import main

    for command, words in (("dit", "Flow-matching training of the SANA DiT"), ("dcae", "Reconstruction training")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert words in text and "Config(" not in text and "output_dir: str" not in text


def test_dit_with_a_missing_cache_writes_nothing(world, tmp_path, capsys):  # noqa: F811
    status, _, err = _cli(capsys, "dit", "--cache-dir", str(tmp_path / "no-cache"), "--model", str(world["arch"]),
                          "--output-dir", str(tmp_path / "run"))
    assert status == 2 and "--cache-dir" in _one_error_line(err) and not (tmp_path / "run").exists()


def test_dcae_fine_tune_keeps_its_scaling_factor_unless_asked(world, tmp_path, capsys):  # noqa: F811
    from trainer.train_dcae import DCAETrainConfig, train_dcae

    base = dict(init=str(world["vae"]), data=str(world["data"]), resolution=32, steps=1, batch_size=2, warmup_steps=1,
                progress=False)
    kept = train_dcae(DCAETrainConfig(output_dir=str(tmp_path / "kept"), **base))
    assert kept["scaling_factor"] == 1.0  # the tiny DC-AE's own
    assert "keeping --init's scaling factor 1.0" in capsys.readouterr().err
    recomputed = train_dcae(DCAETrainConfig(output_dir=str(tmp_path / "new"), scaling_factor="recompute", **base))
    assert recomputed["scaling_factor"] != 1.0
    with pytest.raises(SanaInputError, match="--scaling-factor 'keep'"):
        train_dcae(DCAETrainConfig(output_dir=str(tmp_path / "x"), config_json=str(tmp_path / "none.json"),
                                   scaling_factor="keep", data=str(world["data"])))


def test_runs_and_models_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("runs/dit/checkpoints/step_0000001/state.pt", "models/shapes-tiny/vae/config.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
