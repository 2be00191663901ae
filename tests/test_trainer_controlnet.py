"""ControlNet training (issue 19 §6): the shapes world's edge maps, a cache with control images
(round trip, staleness, refusal), `trainer controlnet` (a frozen DiT, the exports
`sana.load_controlnet` reads, bit-exact resume, option errors), on tiny models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sana import load_controlnet, load_dit
from sana.dcae_io import load_dcae
from sana.dit import SanaDiT, SanaDiTConfig
from sana.dit_io import save_dit
from sana.errors import SanaCheckpointError, SanaInputError
from test_trainer import world  # noqa: F401  (the shared tiny models and their DiT-only cache)
from trainer import shapes
from trainer.__main__ import main
from trainer.cache import LatentCache, build_cache
from trainer.controlnet_config import ControlNetTrainConfig
from trainer.data import load_fitted, read_records
from trainer.train_controlnet import train_controlnet


@pytest.fixture(scope="module")
def control_world(world, tmp_path_factory) -> dict:  # noqa: F811
    """16 shapes images with their edge maps (control/ beside data/), their cache, and a tiny DiT of 3 blocks."""
    root = tmp_path_factory.mktemp("controlnet")
    data = shapes.write_dataset(root / "data", 16, side=32, seed=1, control_dir=root / "control")
    cache = root / "cache"
    _build(world, data, cache, root / "control")
    torch.manual_seed(0)
    arch = SanaDiTConfig.from_dict(json.loads(Path(world["arch"]).read_text())).replace(depth=3)
    save_dit(SanaDiT(arch), root / "dit")
    return {"root": root, "data": data, "control": root / "control", "cache": cache, "dit": root / "dit"}


def _build(world, data: Path, cache: Path, control_dir: Path | None, **changes):  # noqa: F811
    options = dict(vae=world["vae"], text_encoder=world["root"] / "text_encoder", resolution=32, shard_size=8, batch_size=4,
                   max_length=32, min_psnr=0, progress=False)
    return build_cache(read_records(data, control_dir=control_dir), cache, **{**options, **changes})


def _config(control_world, out: Path, **changes) -> ControlNetTrainConfig:
    base = dict(output_dir=str(out), cache_dir=str(control_world["cache"]), init=str(control_world["dit"]), steps=4,
                batch_size=4, lr=1e-3, save_every=2, log_every=1, progress=False, ema_decay=0.9, report_to="none")
    return ControlNetTrainConfig(**{**base, **changes})


# --- the edge map ---------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 7, 40, 95, 170])
def test_edge_map_lies_on_the_mask_boundary(index):
    """Every edge pixel touches the other side of the foreground mask (4-neighbours); every pixel
    two or more steps from the boundary is black; each object has edges."""
    scene = shapes.all_scenes()[index]
    image = shapes.render(scene, 64, np.random.default_rng(index))
    edges = shapes.edge_map(image)
    assert edges.shape == image.shape and edges.dtype == np.uint8
    assert set(np.unique(edges)) <= {0, 255} and (edges == edges[..., :1]).all()
    mask = shapes.foreground_mask(image)
    padded = np.pad(mask, 1, mode="edge")
    on_boundary = np.zeros_like(mask)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        on_boundary |= neighbour != mask
    white = edges[..., 0] == 255
    assert np.array_equal(white, on_boundary)
    # Far from the boundary (deep inside an object, or in the background): black.
    near = np.pad(on_boundary, 1)
    grown = near[1:-1, 1:-1] | near[:-2, 1:-1] | near[2:, 1:-1] | near[1:-1, :-2] | near[1:-1, 2:]
    assert not white[~grown].any() and (~grown).sum() > 0.5 * mask.size
    assert white.sum() >= 4 * scene.count * 4  # a closed outline per object


def test_edge_map_is_empty_without_objects():
    background = np.broadcast_to(np.array(shapes.BACKGROUND, dtype=np.uint8), (16, 16, 3)).copy()
    assert not shapes.edge_map(background).any()


def test_write_dataset_writes_each_images_edge_map(tmp_path):
    data = shapes.write_dataset(tmp_path / "data", 3, side=32, seed=5, control_dir=tmp_path / "control")
    plain = shapes.write_dataset(tmp_path / "plain", 3, side=32, seed=5)
    for name in ("000000.png", "000001.png", "000002.png"):
        image = np.asarray(Image.open(data / name))
        assert np.array_equal(image, np.asarray(Image.open(plain / name)))  # control images change no image
        assert np.array_equal(np.asarray(Image.open(tmp_path / "control" / name)), shapes.edge_map(image))


def test_caption_without_position_names_no_position():
    for scene in shapes.held_out_scenes():
        prompt = shapes.caption_without_position(scene)
        assert not any(word in prompt.split() for word in shapes.POSITIONS), prompt
        parsed = shapes.parse_prompt(prompt)
        assert (parsed.colour, parsed.shape, parsed.count) == (scene.colour, scene.shape, scene.count)


# --- the cache --------------------------------------------------------------------------------


def test_cache_holds_each_samples_control_latent(world, control_world):  # noqa: F811
    cache = LatentCache(control_world["cache"])
    assert cache.has_control and len(cache) == 16
    dcae = load_dcae(world["vae"], dtype=torch.float32)
    for i in (0, 9):
        meta = cache.meta[i]
        control_file = Path(meta["control"])
        assert control_file == control_world["control"] / Path(meta["image"]).name
        pixels = load_fitted(control_file, size=tuple(meta["bin"]))
        with torch.no_grad():
            expected = dcae.encode(pixels[None])[0] * dcae.scaling_factor
        # Same encoder, another batch composition: equal up to fp32 reduction order.
        torch.testing.assert_close(cache.control(i), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cache.control(i), cache[i][0])  # not the image's latent


def test_cache_refuses_a_changed_control_image(world, control_world, tmp_path):  # noqa: F811
    data, control = tmp_path / "data", tmp_path / "control"
    shutil.copytree(control_world["data"], data)
    shutil.copytree(control_world["control"], control)
    _build(world, data, tmp_path / "cache", control)
    current = _build(world, data, tmp_path / "cache", control)  # unchanged: reused
    assert current["samples"] == 16
    edges = np.asarray(Image.open(control / "000003.png")).copy()
    edges[:8] = 255 - edges[:8]
    Image.fromarray(edges).save(control / "000003.png")
    os.utime(control / "000003.png", ns=(1, 1))  # another mtime: its content is hashed
    with pytest.raises(SanaCheckpointError, match=r"1 control image\(s\) changed \(000003.png"):
        _build(world, data, tmp_path / "cache", control)


def test_cache_refuses_to_drop_or_add_control_images(world, control_world, tmp_path):  # noqa: F811
    with pytest.raises(SanaCheckpointError, match=r"control images .* True \(cache\) → False \(now\)"):
        _build(world, control_world["data"], control_world["cache"], None)
    with pytest.raises(SanaCheckpointError, match=r"control images .* False \(cache\) → True \(now\)"):
        _build(world, world["data"], world["cache"], control_world["control"], resolution=32, shard_size=10, max_length=300)


def test_images_without_a_control_image_are_left_out(control_world, tmp_path):
    control = tmp_path / "control"
    shutil.copytree(control_world["control"], control)
    (control / "000004.png").unlink()
    with pytest.warns(UserWarning, match="1 image"):
        records = read_records(control_world["data"], control_dir=control)
    assert len(records) == 15 and records.without_control == [str(control_world["data"] / "000004.png")]
    assert all(r.control == control / r.image.name for r in records)
    with pytest.raises(SanaInputError, match="--control-dir"):
        read_records(control_world["data"], control_dir=tmp_path / "nowhere")


def test_manifest_rows_name_their_control_image(control_world, tmp_path):
    manifest = tmp_path / "data.jsonl"
    rows = [{"image": str(control_world["data"] / f"00000{i}.png"), "caption": "a red circle",
             "control": str(control_world["control"] / f"00000{i}.png")} for i in range(3)]
    rows.append({"image": str(control_world["data"] / "000003.png"), "caption": "a blue square"})
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(UserWarning, match="without a control image"):
        records = read_records(manifest)
    assert [r.control.name for r in records] == ["000000.png", "000001.png", "000002.png"]
    with pytest.raises(SanaInputError, match="--control-dir"):
        read_records(manifest, control_dir=control_world["control"])


# --- training ---------------------------------------------------------------------------------


def test_controlnet_trains_and_leaves_the_dit_alone(control_world, tmp_path):
    """A few steps through the command line: the exports load with sana.load_controlnet, the
    ControlNet moved off its zero start, and the base DiT is bit-exact what it was."""
    out = tmp_path / "run"
    argv = ["controlnet", "--cache-dir", str(control_world["cache"]), "--init", str(control_world["dit"]), "--output-dir",
            str(out), "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--log-every", "1", "--progress", "false",
            "--report-to", "none", "--controlnet-blocks", "2"]
    assert main(argv) == 0
    raw = load_controlnet(out / "controlnet.safetensors")
    ema = load_controlnet(out / "controlnet_ema.safetensors")
    assert raw.config.depth == 2
    assert all(float(p.weight.detach().abs().max()) > 0 for p in (raw.input_proj, *raw.output_projs))  # not the zero start
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), ema.state_dict().values()))
    base = load_dit(control_world["dit"]).state_dict()
    trained = train_controlnet(_config(control_world, tmp_path / "again", steps=2))["model"]
    assert all(torch.equal(base[k], v) for k, v in trained.dit.state_dict().items())
    # The trained ControlNet steers the DiT: its residuals given a control latent are not zero.
    cache = LatentCache(control_world["cache"])
    latent, text = cache[0]
    with torch.no_grad():
        residuals = raw(latent[None], torch.tensor([500.0]), text[None].float(), cache.control(0)[None])
    assert float(residuals[-1].abs().max()) > 0


def test_resume_reproduces_the_uninterrupted_run_exactly(world, control_world, tmp_path):  # noqa: F811
    straight = _config(control_world, tmp_path / "straight", sample_every=2, vae=str(world["vae"]), sample_steps=2)
    train_controlnet(straight)
    train_controlnet(_config(control_world, tmp_path / "resumed", steps=2))
    train_controlnet(_config(control_world, tmp_path / "resumed"))
    for name in ("controlnet.safetensors", "controlnet_ema.safetensors"):
        a = load_controlnet(tmp_path / "straight" / name).state_dict()
        b = load_controlnet(tmp_path / "resumed" / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    loss_a = [json.loads(x)["loss"] for x in (tmp_path / "straight" / "loss.jsonl").read_text().splitlines()]
    loss_b = [json.loads(x)["loss"] for x in (tmp_path / "resumed" / "loss.jsonl").read_text().splitlines()]
    assert loss_a == loss_b and len(loss_a) == 4
    assert (tmp_path / "straight" / "samples" / "step_0000004.png").is_file()
    # The checkpoint keeps the ControlNet only: the frozen DiT is --init's.
    state = torch.load(tmp_path / "straight" / "checkpoints" / "step_0000004" / "state.pt", weights_only=True)
    assert state["model"] and all(k.startswith("controlnet.") for k in state["model"])


def test_a_saved_controlnet_trains_further(control_world, tmp_path):
    train_controlnet(_config(control_world, tmp_path / "first", steps=2, ema_decay=0.0))
    first = tmp_path / "first" / "controlnet.safetensors"
    train_controlnet(_config(control_world, tmp_path / "second", steps=1, ema_decay=0.0, controlnet=str(first)))
    a, b = load_controlnet(first).state_dict(), load_controlnet(tmp_path / "second" / "controlnet.safetensors").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_a_cache_without_control_images_is_refused(world, control_world, tmp_path):  # noqa: F811
    with pytest.raises(SanaInputError, match="holds no control images"):
        train_controlnet(_config(control_world, tmp_path / "run", cache_dir=str(world["cache"])))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("changes, option", [
    ({"lora_rank": 4}, "--lora-rank"),
    ({"model": "sana-600m-1024"}, "--model"),
    ({"init": ""}, "--init"),
    ({"controlnet_blocks": -1}, "--controlnet-blocks"),
    ({"controlnet": "missing.safetensors"}, "--controlnet"),
    ({"controlnet": "x", "controlnet_blocks": 2}, "--controlnet-blocks"),
    ({"controlnet_blocks": 3}, "--controlnet-blocks"),  # the DiT has 3 blocks: at most 2
    ({"lr": 0.0}, "--lr"),
])
def test_option_errors_name_the_option(control_world, tmp_path, changes, option):
    with pytest.raises(SanaInputError, match=f"^{option} "):
        train_controlnet(_config(control_world, tmp_path / "run", **changes))


def test_the_dit_only_options_are_not_on_its_command_line(control_world, capsys):
    assert main(["controlnet", "--cache-dir", str(control_world["cache"]), "--init", str(control_world["dit"]),
                 "--lr", "-1"]) == 2
    assert "--lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["controlnet", "--lora-rank", "4"])


def test_controlnet_demo_runs_end_to_end_on_tiny_settings(tmp_path):
    """The demo's stages on the shipped model with a handful of images and steps (its figure is a
    bench, docs/BENCHMARKS.md); a rerun with other options is refused, naming them."""
    from trainer.controlnet_demo import DemoOptions, run_controlnet_demo

    options = DemoOptions(count=8, steps=2, batch_size=4, seeds=1, sample_steps=2)
    result = run_controlnet_demo(tmp_path / "demo", options, progress=False)
    for name in ("with_control", "without_control"):
        assert result[name]["images"] == result["held_out_scenes"] == len(shapes.held_out_scenes())
        assert 0.0 <= result[name]["position"] <= 1.0
    assert json.loads((tmp_path / "demo" / "controlnet_demo.json").read_text())["with_control"] == result["with_control"]
    assert (tmp_path / "demo" / "controlnet_demo.png").stat().st_size > 1000
    captions = [p.read_text() for p in (tmp_path / "demo" / "data").glob("*.txt")]
    assert len(captions) == 8 and not any(word in c.split() for c in captions for word in shapes.POSITIONS)
    with pytest.raises(SanaInputError, match="--steps 2 → 3"):
        run_controlnet_demo(tmp_path / "demo", DemoOptions(count=8, steps=3, batch_size=4, seeds=1, sample_steps=2), progress=False)


CONTROLNET_WORKER = """
import sys
from trainer.controlnet_config import ControlNetTrainConfig
from trainer.distributed import shutdown
from trainer.train_controlnet import train_controlnet

train_controlnet(ControlNetTrainConfig(output_dir=sys.argv[1], cache_dir=sys.argv[2], init=sys.argv[3], distributed=sys.argv[4],
                                       steps=3, batch_size=4, lr=1e-3, save_every=3, log_every=1, progress=False,
                                       ema_decay=0.9, report_to="none"))
shutdown()
"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_train_as_one(control_world, tmp_path, strategy):
    """torchrun with 2 processes trains the ControlNet as one process with the same global batch."""
    import subprocess
    import sys

    from test_trainer_distributed import _failure

    script = tmp_path / "worker.py"
    script.write_text(CONTROLNET_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path / "two"), str(control_world["cache"]), str(control_world["dit"]), strategy]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, _failure(run)
    train_controlnet(_config(control_world, tmp_path / "one", steps=3, save_every=3))
    for name in ("controlnet.safetensors", "controlnet_ema.safetensors"):
        a = load_controlnet(tmp_path / "one" / name).state_dict()
        b = load_controlnet(tmp_path / "two" / name).state_dict()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-4, (name, worst)  # fp32 gradients averaged over 2 ranks vs summed in one batch


def test_an_unreadable_control_image_skips_its_sample_until_it_is_fixed(world, control_world, tmp_path):  # noqa: F811
    data, control = tmp_path / "data", tmp_path / "control"
    shutil.copytree(control_world["data"], data)
    shutil.copytree(control_world["control"], control)
    good = (control / "000002.png").read_bytes()
    (control / "000002.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="1 unreadable"):
        summary = _build(world, data, tmp_path / "cache", control)
    assert summary["samples"] == 15 and summary["skipped"] == [str(data / "000002.png")]
    (control / "000002.png").write_bytes(good)  # fixed: the sample is encoded now
    assert _build(world, data, tmp_path / "cache", control)["samples"] == 16
