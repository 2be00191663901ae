"""Generation never returns a silent NaN (black) image and never allocates without bound
(issue 14 §2, and §3's first bullet: the atomic PNG write).

- every numeric argument of `sana.generate` is checked before any compute (the text encoder is
  replaced by a tripwire), with a `SanaInputError` naming the argument and the value;
- a stage that produces NaN/inf (text encoding, image encoding, a denoising step, decoding)
  raises `SanaNonFiniteError` naming it; the CLI then prints one `error:` line, writes no PNG
  and exits 2; the node samplers and decode raise the same way;
- the DC-AE never runs in fp16 (the shipped model decodes NaN there): safe default dtypes in
  `load_dcae`, the CLI and the DC-AE Loader, an explicit fp16 refused or replaced;
- sizes are capped at 16384 px a side and by a memory estimate, before allocating;
- the shipped model generates with the CLI's defaults;
- the PNG write is atomic, and a failing write is one `error:` line naming the path.

Components are the tiny random models of `test_pipeline.py` / `node_fixtures.py`.
"""

from __future__ import annotations

import copy
import errno
import io
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sana
from node_fixtures import ext_module
from sana.cli import main, write_png
from sana.dcae import default_dcae_dtype
from sana.dcae_io import load_dcae, stored_dcae_dtype
from sana.errors import SanaCheckpointError, SanaInputError, SanaNonFiniteError
from sana.pipeline import MAX_GUIDANCE, check_sampling_values, generation_size
from sana.resolution import MAX_IMAGE_SIDE
from sana.samplers import NonFiniteWatch, flow_dpm_solver, flow_euler
from sana.schedules import flow_dpm_schedule, flow_euler_schedule
from test_pipeline import LATENT_CHANNELS, Components

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "shapes-tiny"
REQUEST = dict(prompt="a cat", steps=2, height=64, width=64, resolution_binning=False, seed=0)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Components:
    return Components(tmp_path_factory.mktemp("safety_parts"))


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if generate gets as far as encoding the prompt."""

    def tripwire(*args, **kwargs):
        raise AssertionError("generate started computing before refusing the request")

    monkeypatch.setattr(sana.pipeline, "encode_prompts", tripwire)


def _png(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)


# ---------------------------------------------------------------------------------------
# Every number is checked before any compute


def _nan_at(shape, index=0):
    tensor = torch.rand(shape)
    tensor.view(-1)[index] = float("nan")
    return tensor


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(guidance_scale=float("inf")), r"guidance_scale must be a finite number in \[-1000, 1000\], got inf"),
        (dict(guidance_scale=1e30), r"guidance_scale .* got 1e\+30"),
        (dict(guidance_scale=float("nan")), r"guidance_scale .* got nan"),  # was: no guidance
        (dict(guidance_scale="4.5"), r"guidance_scale must be a number, got '4.5'"),
        (dict(pag_scale=float("nan")), r"pag_scale .* got nan"),
        (dict(pag_scale=-1e9), r"pag_scale .* got -1000000000.0"),
        (dict(flow_shift=float("nan")), r"flow_shift must be a finite number in \[0.01, 100\], got nan"),
        (dict(flow_shift=0.0), r"flow_shift .* got 0.0"),
        (dict(flow_shift=1e6), r"flow_shift .* got 1000000.0"),
        (dict(steps=0), r"steps must be an integer in \[1, 10000\], got 0"),
        (dict(steps=10**9), r"steps must be an integer in \[1, 10000\], got 1000000000"),
        (dict(steps=2.0), r"steps must be an integer, got 2.0"),
        (dict(steps=True), r"steps must be an integer, got True"),
        (dict(seed=-1), r"seed must be an integer in \[0, 18446744073709551615\], got -1"),
        (dict(seed=2**64), r"seed .* got 18446744073709551616"),  # was a raw ValueError from torch
        (dict(seed=1.5), r"seed must be an integer, got 1.5"),
        (dict(strength=float("nan"), image=torch.rand(1, 64, 64, 3)), r"strength .* got nan"),
        (dict(strength=1.5), r"strength must be a finite number in \[0, 1\], got 1.5"),
        (dict(height=100_000), r"height must be an integer in \[1, 16384\], got 100000"),
        (dict(width=0), r"width must be an integer in \[1, 16384\], got 0"),
        (dict(width=64.0), r"width must be an integer, got 64.0"),
        (dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
        (dict(pag_scale=2.0, pag_layers="1"), r"pag_layers must be a list of DiT block indices, got '1'"),
        (dict(pag_scale=2.0, pag_layers=[1.5]), r"pag_layers entry must be an integer, got 1.5"),
        (dict(pag_scale=2.0, pag_layers=[]), r"pag_layers is empty"),
        (dict(latents=_nan_at((1, LATENT_CHANNELS, 8, 8))), r"latents hold NaN or infinite values"),
        (dict(latents=torch.zeros(1, LATENT_CHANNELS, 8, 8, dtype=torch.int64)), r"latents must be a float tensor"),
        (dict(image=_nan_at((1, 64, 64, 3))), r"image values must be finite and in \[0, 1\] .* found \[nan, nan\]"),
        (dict(image=torch.full((1, 64, 64, 3), 255.0)), r"image values must be finite and in \[0, 1\] .* \[255.0, 255.0\]"),
        (dict(image=torch.rand(3, 64, 64, 3)), r"got 3 images for a batch of 1; pass 1 or 1"),
        (dict(image=torch.rand(64, 64, 4)), r"image must be \[B, H, W, 3\]"),
        (dict(negative_prompt=None), r"negative_prompt must be a string, got None"),
        (dict(callback=3), r"callback must be callable or None, got 3"),
    ],
)
def test_unusable_values_are_named_before_any_compute(parts, no_compute, kwargs, message):
    with pytest.raises(SanaInputError, match=message):
        parts.generate(**{**REQUEST, **kwargs})


def test_bounds_are_inclusive_and_seeds_cover_uint64():
    check_sampling_values(guidance_scale=MAX_GUIDANCE, pag_scale=-MAX_GUIDANCE, flow_shift=100.0, seed=2**64 - 1,
                          steps=10_000, strength=0.0, height=MAX_IMAGE_SIDE, width=1)
    with pytest.raises(SanaInputError, match="guidance_scale"):
        check_sampling_values(guidance_scale=MAX_GUIDANCE * (1 + 2**-52))
    with pytest.raises(SanaInputError, match=r"--cfg must be a finite number"):
        check_sampling_values(guidance_scale=float("nan"), names={"guidance_scale": "--cfg"})


def test_largest_seed_generates_and_seeds_are_exact_integers(parts):
    import numpy as np

    top = parts.generate(**{**REQUEST, "seed": 2**64 - 1})
    assert torch.isfinite(top).all() and top.std() > 0.01
    # A numpy integer is an integer: the same image as the Python int.
    assert torch.equal(parts.generate(**{**REQUEST, "seed": np.uint64(7)}), parts.generate(**{**REQUEST, "seed": 7}))


# ---------------------------------------------------------------------------------------
# Non-finite stages raise, naming the stage


def _poisoned(module: torch.nn.Module, name: str) -> torch.nn.Module:
    module = copy.deepcopy(module)
    with torch.no_grad():
        module.get_parameter(name).view(-1)[0] = float("nan")
    return module


def test_nan_dit_weights_name_the_first_denoising_step(parts):
    dit = _poisoned(parts.dit, "final_layer.linear.weight")
    steps = []
    with pytest.raises(SanaNonFiniteError, match=r"denoising produced NaN/inf latents at step 1 of 3; check the DiT"):
        parts.generate(**{**REQUEST, "dit": dit, "steps": 3, "callback": lambda i, n, x0: steps.append(i)})
    assert steps == [0, 1, 2]  # the user's callback still runs, and the loop was not cut short


def test_watch_names_the_step_that_went_non_finite_and_reads_the_device_once():
    calls = []

    def velocity(x, t):
        calls.append(1)
        return torch.full_like(x, float("inf")) if len(calls) == 3 else torch.zeros_like(x)

    watch = NonFiniteWatch()
    final = flow_euler(velocity, torch.randn(1, 4, 2, 2), flow_euler_schedule(5, 3.0), callback=watch)
    with pytest.raises(SanaNonFiniteError, match="denoising produced NaN/inf latents at step 3 of 5"):
        watch.check(final)

    # On the meta device every read of a value fails: the whole loop runs with the watch
    # attached, and only `check` reads (once), so no step waits on the host.
    meta = NonFiniteWatch()
    out = flow_dpm_solver(lambda x, t: x * 0.5, torch.randn(2, 4, 3, 3, device="meta"), flow_dpm_schedule(4, 3.0), callback=meta)
    assert out.device.type == "meta" and len(meta._finite) == 4
    with pytest.raises((NotImplementedError, RuntimeError)):
        meta.check(out)


def test_nan_text_embeddings_name_the_text_encoding(parts, monkeypatch):
    encode = parts.text_encoder.encode

    def nan_encode(prompts, **kwargs):
        embeddings, mask = encode(prompts, **kwargs)
        return embeddings * float("nan"), mask

    monkeypatch.setattr(parts.text_encoder, "encode", nan_encode)
    with pytest.raises(SanaNonFiniteError, match=r"text encoding \(the text encoder .*gemma\) produced NaN/inf"):
        parts.generate(**REQUEST)


def test_nan_dcae_names_decoding_and_image_encoding(parts):
    decoder = _poisoned(parts.dcae, "decoder.conv_out.weight")
    with pytest.raises(SanaNonFiniteError, match=r"decoding \(DC-AE decode\) produced NaN/inf"):
        sana.pipeline.generate(dit=parts.dit, dcae=decoder, text_encoder=parts.text_encoder, **REQUEST)
    encoder = _poisoned(parts.dcae, "encoder.conv_in.weight")
    with pytest.raises(SanaNonFiniteError, match=r"image encoding \(DC-AE encode\) produced NaN/inf"):
        sana.pipeline.generate(dit=parts.dit, dcae=encoder, text_encoder=parts.text_encoder,
                               **{**REQUEST, "image": torch.rand(1, 64, 64, 3), "strength": 0.5})


def _nan_dit_folder(parts: Components, folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_bytes((parts.dit_folder / "config.json").read_bytes())
    state = load_file(parts.dit_folder / "diffusion_pytorch_model.safetensors")
    name = next(k for k in state if k.startswith("proj_out") and k.endswith("weight"))
    state[name][0, 0] = float("nan")
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_cli_reports_a_non_finite_result_and_writes_nothing(parts, tmp_path, capsys):
    dit = _nan_dit_folder(parts, tmp_path / "nan_dit")
    out = tmp_path / "out.png"
    args = ["generate", "--dit", str(dit), "--vae", str(parts.vae_folder), "--text-encoder", str(parts.gemma_folder),
            "--out", str(out), "--width", "64", "--height", "64", "--no-binning", "--steps", "2", "--device", "cpu",
            "--prompt", "a cat"]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "denoising produced NaN/inf latents at step 1 of 2" in errors[0]
    assert not list(tmp_path.glob("*.png"))


# ---------------------------------------------------------------------------------------
# The DC-AE never runs in fp16


def _shipped_latents() -> torch.Tensor:
    # Latents at the scale the shipped DC-AE decodes (unit-variance DiT latents / scaling factor).
    return torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0)) / 0.04042


@pytest.mark.skipif(not (SHIPPED / "vae").is_dir(), reason="shipped model absent")
def test_shipped_fp16_dcae_loads_in_a_safe_dtype_and_decodes_finite():
    assert stored_dcae_dtype(SHIPPED / "vae") == torch.float16
    dcae = load_dcae(SHIPPED / "vae")  # dtype=None: was the stored fp16, which decodes 67% NaN
    assert dcae.dtype == torch.float32 == default_dcae_dtype("cpu")
    with torch.no_grad():
        assert torch.isfinite(dcae.decode(_shipped_latents())).all()
    with pytest.raises(SanaInputError, match=r"dtype float16: the DC-AE overflows in float16 .* use bfloat16 or float32"):
        load_dcae(SHIPPED / "vae", dtype=torch.float16)
    half = copy.deepcopy(dcae).to(torch.float16)
    with pytest.raises(SanaInputError, match=r"DC-AE decode in float16: the DC-AE overflows"):
        half.decode(_shipped_latents())


def test_safe_dcae_dtype_by_device():
    assert default_dcae_dtype("cpu") == torch.float32
    assert default_dcae_dtype("xpu") == torch.bfloat16  # an accelerator: bf16 (never fp16)


@pytest.mark.skipif(not (SHIPPED / "vae").is_dir(), reason="shipped model absent")
def test_cli_refuses_fp16_vae_and_convert_keeps_the_stored_dtype(tmp_path, capsys):
    args = ["generate", "--dit", "missing", "--vae", "missing", "--text-encoder", "missing", "--prompt", "a",
            "--out", str(tmp_path / "x.png"), "--vae-dtype", "fp16"]
    assert main(args) == 2  # refused before loading anything (the paths do not even exist)
    assert "error: --vae-dtype float16: the DC-AE overflows in float16" in capsys.readouterr().err
    # convert loads in a runnable dtype but stores what the file had (fp16 here) unless told.
    assert main(["convert", "vae", str(SHIPPED / "vae"), str(tmp_path / "vae.safetensors")]) == 0
    assert stored_dcae_dtype(tmp_path / "vae.safetensors") == torch.float16
    assert main(["convert", "vae", str(SHIPPED / "vae"), str(tmp_path / "vae32.safetensors"), "--dtype", "fp32"]) == 0
    assert stored_dcae_dtype(tmp_path / "vae32.safetensors") == torch.float32


# ---------------------------------------------------------------------------------------
# Sizes: a hard cap, and a memory estimate, before allocating


def test_decoded_images_that_cannot_fit_are_refused_before_compute(parts, no_compute, monkeypatch):
    free = {}

    def budget(device):
        free[torch.device(device).type] = True
        return 100_000  # bytes: less than one 64x64 image's float32 pixels plus its copy

    monkeypatch.setattr(sana.pipeline, "default_memory_budget", budget)
    with pytest.raises(SanaInputError, match=r"1 image\(s\) of 64x64 px .* need at least 0.0 GiB on cpu .* fewer or smaller"):
        parts.generate(**REQUEST)
    assert free == {"cpu": True}


def test_sprint_noise_for_runaway_steps_is_refused_before_compute(parts, no_compute, monkeypatch):
    # 1 MiB: room for a 64x64 image (0.15 MB), not for 10000 steps of 2 kB pre-drawn noise (20 MB).
    monkeypatch.setattr(sana.pipeline, "default_memory_budget", lambda device: 2**20)
    with pytest.raises(SanaInputError, match=r"10000 SANA-Sprint steps need at least 0.0 GiB on cpu for the noise"):
        parts.generate(**{**REQUEST, "dit": parts.sprint, "steps": 10_000})


def test_a_dit_without_bins_samples_at_the_nearest_multiple(parts):
    tiny = sana.SanaDiT(parts.dit.config.replace(sample_size=4))
    # The tiny pipeline's token is 8 px (compression 8, patch 1): 100 -> 96 and 61 -> 64.
    assert generation_size(tiny, parts.dcae, 100, 61, resolution_binning=True) == (96, 64)
    assert generation_size(tiny, parts.dcae, 3, 8, resolution_binning=True) == (8, 8)


@pytest.mark.skipif(not (SHIPPED / "transformer").is_dir(), reason="shipped model absent")
def test_shipped_model_generates_with_the_cli_defaults(tmp_path, capsys):
    out = tmp_path / "shape.png"
    args = ["generate", "--dit", str(SHIPPED / "transformer"), "--vae", str(SHIPPED / "vae"),
            "--text-encoder", str(SHIPPED / "text_encoder"), "--prompt", "a red circle", "--out", str(out),
            "--steps", "4", "--device", "cpu", "--seed", "0"]
    assert main(args) == 0, capsys.readouterr().err  # was: no resolution bins for DiT sample_size 4
    image = _png(out)
    assert image.shape == (128, 128, 3)  # the model's native size: sample_size 4 x compression 32
    assert image.float().std() > 5  # a picture, not a black (NaN) frame

    # A size off the 32 px grid is sampled at the nearest multiple and resized back.
    assert main([*args[:-6], "--out", str(tmp_path / "odd.png"), "--width", "100", "--height", "150",
                 "--steps", "2", "--device", "cpu"]) == 0
    assert _png(tmp_path / "odd.png").shape == (150, 100, 3)


def test_cli_refuses_huge_sizes_before_loading(tmp_path, capsys):
    args = ["generate", "--dit", "missing", "--vae", "missing", "--text-encoder", "missing", "--prompt", "a",
            "--out", str(tmp_path / "x.png"), "--width", "100000", "--height", "100000"]
    assert main(args) == 2
    assert "error: --height must be an integer in [1, 16384], got 100000" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The PNG write is atomic; a failed write is one error line


class _DiskFullAfterHalf(io.RawIOBase):
    """A binary file that accepts the first half of what is written, then fails like a full disk."""

    def __init__(self, real):
        self.real = real
        self.limit: int | None = None

    def writable(self):
        return True

    def write(self, data):
        data = bytes(data)
        if self.limit is None:
            self.limit = max(1, len(data) // 2)
        if len(data) > self.limit:
            self.real.write(data[: self.limit])
            self.real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.write(data)

    def close(self):
        self.real.close()
        super().close()


@pytest.fixture
def disk_full(monkeypatch):
    """Every binary write ('wb') fails half-way, as on a full disk."""
    real_open = io.open

    def failing_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _DiskFullAfterHalf(handle) if "w" in mode and "b" in mode else handle

    monkeypatch.setattr(io, "open", failing_open)


def test_failed_png_write_keeps_the_previous_image(tmp_path, monkeypatch, request):
    path = tmp_path / "out.png"
    previous = torch.rand(6, 5, 3, generator=torch.Generator().manual_seed(1))
    write_png(path, previous)
    before = path.read_bytes()
    request.getfixturevalue("disk_full")
    with pytest.raises(SanaCheckpointError, match=rf"{path}: cannot write: .*No space left on device"):
        write_png(path, torch.rand(60, 50, 3))
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old image, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary left behind


def test_cli_write_failure_is_one_error_line_naming_the_path(parts, tmp_path, capsys, disk_full):
    out = tmp_path / "out.png"
    args = ["generate", "--dit", str(parts.dit_folder), "--vae", str(parts.vae_folder), "--text-encoder",
            str(parts.gemma_folder), "--out", str(out), "--width", "64", "--height", "64", "--no-binning",
            "--steps", "2", "--device", "cpu", "--prompt", "a cat"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}: cannot write:") and "No space left on device" in errors[0]
    assert "Traceback" not in err and not out.exists()


def test_cli_refuses_an_output_path_that_is_a_folder_before_loading(tmp_path, capsys):
    (tmp_path / "taken.png").mkdir()
    args = ["generate", "--dit", "missing", "--vae", "missing", "--text-encoder", "missing", "--prompt", "a",
            "--out", str(tmp_path / "taken.png")]
    assert main(args) == 2
    assert f"error: --out: {tmp_path / 'taken.png'} is a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The nodes (what they compute: no ComfyUI here)

latents_node = ext_module("nodes.latents")
loaders = ext_module("nodes.loaders")
node_sampling = ext_module("nodes.sampling")
node_vae = ext_module("nodes.vae")
sampling_layer = ext_module("sana.sampling")
ext_errors = ext_module("sana.errors")
ext_schedules = ext_module("sana.schedules")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(cfg=float("nan")), r"cfg must be a finite number in \[-1000, 1000\], got nan"),
        (dict(pag_scale=float("inf")), r"pag_scale .* got inf"),
        (dict(flow_shift=float("nan")), r"flow_shift .* got nan"),
        (dict(denoise=float("nan")), r"denoise .* got nan"),
        (dict(seed=-5), r"seed must be an integer in \[0, 18446744073709551615\], got -5"),
        (dict(steps=0), r"steps must be an integer in \[1, 10000\], got 0"),
    ],
)
def test_ksampler_inputs_are_checked(kwargs, message):
    values = {**dict(seed=0, steps=20, cfg=4.5, flow_shift=0.0, pag_scale=0.0, denoise=1.0), **kwargs}
    with pytest.raises(ext_errors.SanaInputError, match=message):
        node_sampling.check_sampler_inputs(**values)


def test_ksampler_inputs_accept_the_widget_defaults():
    node_sampling.check_sampler_inputs(seed=2**64 - 1, steps=20, cfg=4.5, flow_shift=0.0, pag_scale=0.0, denoise=1.0)
    node_sampling.check_sampler_inputs(steps=2, flow_shift=6.0, denoise=0.5)  # Sana Sigmas' widgets


@pytest.mark.parametrize("solver", ["flow_dpm_solver", "flow_euler", "trigflow"])
def test_node_samplers_raise_on_a_non_finite_model(solver):
    schedule = sampling_layer.sampling_schedule(solver, 3, 3.0)
    calls = []

    def model(x, sigma, **extra):  # ComfyUI's denoised x0; NaN from the second call on
        calls.append(1)
        return x * float("nan") if len(calls) >= 2 else x * 0.5

    sample = node_sampling.sampler_function(solver, schedule.timesteps if solver == "flow_dpm_solver" else None)
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ext_errors.SanaNonFiniteError, match=rf"Sana sampling \({solver}\) produced NaN/inf latents at step 2 of 3"):
        sample(model, x, schedule.sigmas, extra_args={"seed": 0})


def test_node_decode_raises_on_nan_latents_or_nan_dcae():
    from node_fixtures import random_dcae

    dcae_module = ext_module("sana.dcae")
    dcae = random_dcae(dcae_module)
    latents = torch.randn(1, 32, 2, 2)
    assert torch.isfinite(node_vae.decode_latents(dcae, latents)).all()
    with pytest.raises(ext_errors.SanaNonFiniteError, match="the latents to decode hold NaN/inf values: the node that made them"):
        node_vae.decode_latents(dcae, latents * float("nan"))
    with pytest.raises(ext_errors.SanaNonFiniteError, match=r"decoding \(DC-AE decode\) produced NaN/inf"):
        node_vae.decode_latents(_poisoned(dcae, "decoder.conv_out.weight"), latents)
    with pytest.raises(ext_errors.SanaNonFiniteError, match=r"image encoding \(DC-AE encode\) produced NaN/inf"):
        node_vae.encode_images(_poisoned(dcae, "encoder.conv_in.weight"), torch.rand(1, 64, 64, 3))


def test_dcae_loader_never_picks_fp16(caplog):
    with caplog.at_level(logging.WARNING):
        assert loaders.dcae_dtype("fp16", torch.bfloat16, "cpu") == torch.float32
    assert "not loading in fp16" in caplog.text
    assert loaders.dcae_dtype("fp16", torch.float32, "xpu") == torch.bfloat16
    assert loaders.dcae_dtype("auto", torch.float16, "cpu") == torch.float32  # ComfyUI's --fp16-vae
    assert loaders.dcae_dtype("auto", torch.bfloat16, "cpu") == torch.bfloat16
    assert loaders.dcae_dtype("fp32", torch.bfloat16, "cpu") == torch.float32
    with pytest.raises(ext_errors.SanaInputError, match="unknown dtype 'int8'"):
        loaders.dcae_dtype("int8", torch.bfloat16, "cpu")


def test_empty_latent_refuses_sizes_and_batches_that_cannot_fit(monkeypatch):
    with pytest.raises(ext_errors.SanaInputError, match=r"width must be an integer in \[1, 16384\], got 20000"):
        latents_node.empty_latent(20_000, 1024, 1, "off")
    with pytest.raises(ext_errors.SanaInputError, match=r"batch_size must be an integer >= 1, got 0"):
        latents_node.empty_latent(1024, 1024, 0, "off")
    monkeypatch.setattr(latents_node, "default_memory_budget", lambda device: 2**30)
    with pytest.raises(ext_errors.SanaInputError, match=r"batch_size 4096 at 16384x16384 px needs 128.0 GiB of latents"):
        latents_node.empty_latent(16384, 16384, 4096, "off")
    latent, width, height = latents_node.empty_latent(1024, 1024, 2, "1024px")
    assert latent.shape == (2, 32, 32, 32) and (width, height) == (1024, 1024)


def test_schedules_refuse_runaway_step_counts_and_shifts():
    with pytest.raises(ext_errors.SanaInputError, match=r"num_steps must be an integer in \[1, 10000\]"):
        ext_schedules.flow_dpm_schedule(10**9, 3.0)  # would build a 10^9-entry float64 grid first
    with pytest.raises(ext_errors.SanaInputError, match=r"flow shift must be a finite number in \[0.01, 100\], got nan"):
        sampling_layer.sampling_schedule("flow_euler", 4, float("nan"))
