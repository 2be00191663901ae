"""`python -m sana`: generate writes what `sana.generate` returns; convert round-trips; errors exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sana
from dit_checkpoints import random_reference, write_official_pth
from sana.cli import main, output_paths, read_image, write_png
from sana.dcae_io import load_dcae
from sana.pipeline import generate
from test_pipeline import Components

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Components:
    return Components(tmp_path_factory.mktemp("cli_parts"))


def _png(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


def _generate_args(parts: Components, out: Path, *extra: str, dit: Path | None = None) -> list[str]:
    return [
        "generate",
        "--dit", str(dit or parts.dit_folder),
        "--vae", str(parts.vae_folder),
        "--text-encoder", str(parts.gemma_folder),
        "--out", str(out),
        "--width", "64", "--height", "64", "--no-binning", "--seed", "5", "--device", "cpu",
        *extra,
    ]


def test_write_png_round_trips_through_pillow(tmp_path):
    image = torch.rand(5, 7, 3, generator=torch.Generator().manual_seed(0))
    write_png(tmp_path / "x.png", image)
    assert torch.equal(_png(tmp_path / "x.png"), _as_uint8(image))
    assert torch.equal(_as_uint8(read_image(tmp_path / "x.png")[0]), _as_uint8(image))


def test_output_paths():
    assert output_paths(Path("a/out.png"), 1) == [Path("a/out.png")]
    assert output_paths(Path("a/out.png"), 2) == [Path("a/out-0.png"), Path("a/out-1.png")]
    assert output_paths(Path("a/out"), 1) == [Path("a/out.png")]


def test_generate_two_prompts_writes_what_generate_returns(parts, tmp_path, capsys):
    out = tmp_path / "out.png"
    status = main(_generate_args(parts, out, "--prompt", "a cat", "--prompt", "a dog", "--steps", "2", "--cfg", "3"))
    assert status == 0
    expected = generate(
        dit=parts.dit, dcae=parts.dcae, text_encoder=sana.load_text_encoder(parts.gemma_folder),
        prompt=["a cat", "a dog"], steps=2, guidance_scale=3.0, height=64, width=64, seed=5, resolution_binning=False,
    )
    for i in range(2):
        assert torch.equal(_png(tmp_path / f"out-{i}.png"), _as_uint8(expected[i]))
    stderr = capsys.readouterr().err
    assert "denoising" in stderr and "2/2" in stderr  # the tqdm bar
    assert "flow_dpm_solver, 2 steps" in stderr


def test_compile_flag_compiles_the_step(parts, tmp_path, monkeypatch):
    import sana.pipeline

    compiled = []
    monkeypatch.setattr(sana.pipeline, "compiled_step", lambda fn, device: compiled.append(device) or fn)
    plain, with_flag = tmp_path / "plain.png", tmp_path / "compiled.png"
    assert main(_generate_args(parts, plain, "--prompt", "a cat", "--steps", "2")) == 0
    assert compiled == []
    assert main(_generate_args(parts, with_flag, "--prompt", "a cat", "--steps", "2", "--compile")) == 0
    assert len(compiled) == 1
    # Compiled, the caption keeps its padded length (another summation order than the trimmed
    # eager run, ~1e-6 on the float image): an 8-bit value may round the other way, by one level.
    levels = (_png(plain).int() - _png(with_flag).int()).abs()
    assert int(levels.max()) <= 1 and int((levels > 0).sum()) <= levels.numel() // 100


def test_sprint_and_img2img(parts, tmp_path):
    """--sprint takes TrigFlow's 2 default steps; --image feeds image-to-image."""
    source = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(1))
    source = torch.nn.functional.interpolate(source.movedim(-1, 1), size=(64, 64), mode="bilinear").movedim(1, -1)[0]
    write_png(tmp_path / "in.png", source)
    out = tmp_path / "sprint.png"
    args = ["--prompt", "a cat", "--sprint", "--image", str(tmp_path / "in.png"), "--strength", "0.5"]
    assert main(_generate_args(parts, out, *args, dit=parts.sprint_folder)) == 0
    expected = generate(
        dit=parts.sprint, dcae=parts.dcae, text_encoder=sana.load_text_encoder(parts.gemma_folder), prompt="a cat",
        steps=2, image=read_image(tmp_path / "in.png"), strength=0.5, height=64, width=64, seed=5, resolution_binning=False,
    )
    assert torch.equal(_png(out), _as_uint8(expected[0]))


def test_unusable_inputs_exit_2_with_one_error_line(parts, tmp_path, capsys):
    broken = tmp_path / "gemma_without_tokenizer"
    shutil.copytree(parts.gemma_folder, broken)
    (broken / "tokenizer.json").unlink()
    args = _generate_args(parts, tmp_path / "x.png", "--prompt", "a cat")
    args[args.index("--text-encoder") + 1] = str(broken)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: text encoder folder {broken} has no tokenizer" in err
    assert "Traceback" not in err
    assert main(["--debug", *args]) == 2  # --debug adds the traceback, before or after the command
    assert "Traceback" in capsys.readouterr().err
    assert main([*args, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err

    assert main(_generate_args(parts, tmp_path / "x.png", "--prompt", "a cat", "--width", "100")) == 2
    assert "64x100 (height x width) is not a multiple of 8 px" in capsys.readouterr().err

    assert main(_generate_args(parts, tmp_path / "x.png", "--prompt", "a cat", "--solver", "trigflow")) == 2
    assert "'trigflow' needs a SANA-Sprint DiT" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_convert_dit_official_to_diffusers_and_back(tmp_path):
    reference = random_reference("sana-1.5", seed=4)
    official = write_official_pth(reference, tmp_path / "model.pth")
    # A tiny width is no released preset: its architecture comes from a diffusers config.json.
    (tmp_path / "config.json").write_text(json.dumps(dict(reference.config)))
    config = ["--config", str(tmp_path / "config.json")]
    assert main(["convert", "dit", str(official), str(tmp_path / "diffusers"), *config]) == 0
    assert (tmp_path / "diffusers" / "config.json").is_file()
    assert main(["convert", "dit", str(tmp_path / "diffusers"), str(tmp_path / "back.pth"), "--dtype", "bf16"]) == 0
    original = sana.load_dit(official, config=config[1]).state_dict()
    for path, dtype in ((tmp_path / "diffusers", torch.float32), (tmp_path / "back.pth", torch.bfloat16)):
        converted = sana.load_dit(path).state_dict()
        assert converted.keys() == original.keys()
        assert all(torch.equal(converted[k], v.to(dtype)) for k, v in original.items())


def test_convert_vae_diffusers_to_original(parts, tmp_path):
    target = tmp_path / "dc-ae.safetensors"
    assert main(["convert", "vae", str(parts.vae_folder), str(target), "--format", "original"]) == 0
    converted, original = load_dcae(target), load_dcae(parts.vae_folder)
    assert converted.config == original.config
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in original.state_dict().items())


def test_convert_rejects_a_format_of_the_other_component(tmp_path, capsys):
    official = write_official_pth(random_reference("sana", seed=1), tmp_path / "m.pth")
    assert main(["convert", "dit", str(official), str(tmp_path / "x"), "--format", "original"]) == 2
    assert "a DiT is written as 'diffusers' or 'official', not 'original'" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "sana", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "generate" in result.stdout and "convert" in result.stdout


def test_convert_into_a_pipeline_root_says_where_it_wrote(tmp_path, capsys):
    reference = random_reference("sana", seed=2)
    official = write_official_pth(reference, tmp_path / "m.pth")
    (tmp_path / "config.json").write_text(json.dumps(dict(reference.config)))  # a tiny width is no preset
    root = tmp_path / "pipeline"
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "SanaPipeline"}')
    assert main(["convert", "dit", str(official), str(root), "--config", str(tmp_path / "config.json")]) == 0
    assert f"wrote {root / 'transformer'}:" in capsys.readouterr().err
    assert (root / "transformer" / "config.json").is_file() and not (root / "config.json").exists()
