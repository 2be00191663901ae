"""`python -m trainer`: every option is documented; the DC-AE trainer runs and saves a loadable model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer import shapes
from trainer.tiny_models import tiny_dcae_config
from trainer.train_dcae import DCAETrainConfig, decoder_head_parameters, train_dcae
from trainer.train_dit import DiTTrainConfig


def _help(capsys, *command: str) -> str:
    from trainer.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_option(capsys):
    assert "preset" in subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, check=True).stdout
    for command, config in (("dit", DiTTrainConfig), ("dcae", DCAETrainConfig)):
        text = _help(capsys, command)
        for field in dataclasses.fields(config):
            flag = "--" + field.name.replace("_", "-")
            assert flag in text, flag
            assert field.metadata["help"].split()[0] in text
    for command in ("cache", "preset", "pack", "demo", "evaluate"):
        assert "--" in _help(capsys, command)


def test_dcae_training_lowers_reconstruction_loss_and_saves(tmp_path):
    from sana.dcae_io import load_dcae

    config_path = tmp_path / "arch.json"
    config_path.write_text(tiny_dcae_config(latent_channels=8, widths=(8, 16, 16, 32)).to_json())

    def images(rng: np.random.Generator, n: int) -> torch.Tensor:
        drawn = [shapes.render(s, 32, rng) for s in shapes.sample_scenes(n, rng)]
        return torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2).float() / 127.5 - 1

    result = train_dcae(DCAETrainConfig(output_dir=str(tmp_path / "run"), config_json=str(config_path), steps=30,
                                        batch_size=8, lr=3e-3, warmup_steps=5, progress=False, log_every=1), images)
    rows = [float(line.split('"loss": ')[1].split(",")[0]) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert np.mean(rows[-5:]) < 0.7 * np.mean(rows[:3])
    model = load_dcae(result["path"])
    assert model.scaling_factor == result["scaling_factor"] != 1.0
    with torch.no_grad():
        latents = model.encode(images(np.random.default_rng(1), 4)) * model.scaling_factor
    assert 0.5 < float(latents.square().mean().sqrt()) < 2.0  # the scaling factor normalises the latents
    head = {id(p) for p in decoder_head_parameters(model)}
    assert head and not any(id(p) in head for p in model.encoder.parameters())

    # Decoder-only phases keep the latent space: the encoder and its scaling factor are untouched.
    tuned = train_dcae(DCAETrainConfig(output_dir=str(tmp_path / "decoder"), init=result["path"], phase="decoder", steps=2,
                                       batch_size=4, lr=1e-3, warmup_steps=1, progress=False), images)
    retrained = load_dcae(tuned["path"])
    assert retrained.scaling_factor == model.scaling_factor
    before, after = model.state_dict(), retrained.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
