"""DiT checkpoint detection and error handling."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import sana
from dit_checkpoints import official_state_dict, random_reference, write_official_pth
from sana.checkpoint import CheckpointReader, TensorInfo
from sana.dit import DIT_PRESETS, sincos_pos_embed_2d
from sana.dit_io import config_from_diffusers, infer_config, key_specs, load_dit, resolve_config, save_dit


def shapes_only_reader(preset: str, layout: str) -> CheckpointReader:
    """A checkpoint with a release's exact key names and shapes; only `pos_embed` holds data."""
    cfg = DIT_PRESETS[preset]
    infos = {key: TensorInfo(shape, torch.bfloat16) for spec in key_specs(cfg, layout) for key, shape in spec.parts}
    pos = None
    if layout == "official":
        side = cfg.sample_size
        pos = torch.zeros(1, side * side, cfg.hidden_size)
        if cfg.interpolation_scale is not None:
            pos = sincos_pos_embed_2d(cfg.hidden_size, side, side, side, cfg.interpolation_scale)[None]
        pos = pos.bfloat16()  # the 2K/4K releases are bf16
        infos["pos_embed"] = TensorInfo(tuple(pos.shape), pos.dtype)
        infos["y_embedder.y_embedding"] = TensorInfo((300, cfg.caption_channels), torch.bfloat16)

    def read(key: str) -> torch.Tensor:
        assert key == "pos_embed", f"detection must not read {key}"
        return pos.clone()

    return CheckpointReader(os.path.join("/virtual", preset), "torch", infos, read)


@pytest.mark.parametrize("preset", list(DIT_PRESETS))
def test_official_layout_detects_every_release(preset):
    cfg, notes = infer_config(shapes_only_reader(preset, "official"), "official")
    assert cfg == DIT_PRESETS[preset]
    assert cfg.variant == preset
    assert notes == []


@pytest.mark.parametrize("preset", list(DIT_PRESETS))
def test_bare_diffusers_file_detects_all_but_the_pe_resolution(preset):
    reader = shapes_only_reader(preset, "diffusers")
    cfg, notes = infer_config(reader, "diffusers")
    expected = DIT_PRESETS[preset]
    if expected.hidden_size == 2240 and expected.depth == 20 and not expected.qk_norm:
        # 512/1K/2K/4K Sana-1600M share every shape: the loader assumes 1K and says so.
        assert cfg == DIT_PRESETS["sana-1600m-1024"]
        assert any("config=" in note for note in notes)
        with pytest.warns(UserWarning, match="config="):
            resolve_config(reader, "diffusers")
        assert resolve_config(reader, "diffusers", config="sana-1600m-4k") == DIT_PRESETS["sana-1600m-4k"]
    elif expected.sample_size == 16:
        assert cfg == DIT_PRESETS[preset.replace("-512", "-1024")]  # 512 vs 1K: same weights, no PE
    else:
        assert cfg == expected
        assert notes == []


def test_full_width_file_is_detected_end_to_end(tmp_path):
    """A real file at the Sana-600M width (depth cut to 1 to stay small) in the official layout."""
    cfg = DIT_PRESETS["sana-600m-1024"].replace(depth=1, variant="custom")
    model = sana.SanaDiT(cfg).to(torch.bfloat16)
    save_dit(model, tmp_path / "m.pth", format="official")
    # Drop our stored config so detection has only the weights to go on.
    blob = torch.load(tmp_path / "m.pth", weights_only=True)
    torch.save({"state_dict": blob["state_dict"]}, tmp_path / "m.pth")
    loaded = load_dit(tmp_path / "m.pth")
    assert loaded.config == cfg
    assert loaded.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------
# Errors: one exception type, naming the file and what is wrong
# ------------------------------------------------------------------------------------------


@pytest.fixture
def official_file(tmp_path):
    ref = random_reference("sana-1.5")
    return write_official_pth(ref, tmp_path / "model.pth"), config_from_diffusers(dict(ref.config))


def test_missing_file(tmp_path):
    with pytest.raises(sana.SanaCheckpointError, match="no such file"):
        load_dit(tmp_path / "nope.safetensors")


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a checkpoint")
    with pytest.raises(sana.SanaCheckpointError, match="unknown checkpoint format"):
        load_dit(path)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.conv.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(sana.SanaCheckpointError, match=r"unknown format.*encoder\.conv\.weight"):
        load_dit(other)


def test_truncated_safetensors(tmp_path):
    ref = random_reference("sana")
    ref.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(sana.SanaCheckpointError, match="truncated"):
        load_dit(tmp_path / "m")


def test_corrupt_files(tmp_path, official_file):
    path, config = official_file
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(sana.SanaCheckpointError, match="cut.pth"):
        load_dit(tmp_path / "cut.pth", config=config)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(sana.SanaCheckpointError, match="corrupt"):
        load_dit(garbage)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = official_state_dict(random_reference("sana-1.5"))
    config = config_from_diffusers(dict(random_reference("sana-1.5").config))
    del sd["blocks.1.attn.proj.bias"], sd["blocks.0.cross_attn.k_norm.weight"]
    sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
    torch.save({"state_dict": sd}, tmp_path / "m.pth")
    with pytest.raises(sana.SanaCheckpointError) as info:
        load_dit(tmp_path / "m.pth", config=config)
    message = str(info.value)
    assert "m.pth" in message
    assert "blocks.1.attn.proj.bias" in message and "blocks.0.cross_attn.k_norm.weight" in message
    assert "unexpected keys (1): ['blocks.0.attn.extra.weight']" in message


def test_wrong_shape_names_key_expected_and_found(tmp_path, official_file):
    path, config = official_file
    with pytest.raises(sana.SanaCheckpointError) as info:
        load_dit(path, config=config.replace(caption_channels=config.caption_channels + 2))
    assert "y_embedder.y_proj.fc1.weight: expected [12, 12], found [12, 10]" in str(info.value)


def test_unreleased_width_without_config_asks_for_one(tmp_path):
    ref = random_reference("sana")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(sana.SanaCheckpointError, match="pass config="):
        load_dit(tmp_path / "m.safetensors")


def test_bad_config_argument(official_file):
    path, _ = official_file
    with pytest.raises(sana.SanaInputError, match="neither a preset"):
        load_dit(path, config="sana-9000m")


def test_failed_save_leaves_the_old_file_untouched(tmp_path, official_file, monkeypatch):
    path, config = official_file
    model = load_dit(path, config=config)
    target = tmp_path / "out.pth"
    target.write_bytes(b"previous checkpoint")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(sana.SanaCheckpointError, match="out.pth: cannot write: disk full"):
        save_dit(model, target, format="official")
    assert target.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.pth", "out.pth"])
