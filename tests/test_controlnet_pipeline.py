"""`sana.generate` with a ControlNet against diffusers' `SanaControlNetPipeline` on the same tiny
random weights (both released head layouts, scaled down), and what diffusers has no reference for:
the steps the ControlNet acts on, the checks made before any compute, the compiled step.

Components as in tests/test_pipeline.py (tiny Gemma-2, a 4-stage DC-AE of compression 8); the
DiT and the ControlNet are diffusers models (`controlnet_checkpoints`) saved and read back
through our loaders. Both sides run in fp32 from the same seed and are compared as images.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaControlNetPipeline, SanaTransformer2DModel
from transformers import AutoTokenizer, Gemma2Model

import sana
from controlnet_checkpoints import WIDTHS, random_base, random_controlnet
from node_fixtures import randomize_at_trained_scale
from sana.dcae_io import load_dcae
from sana.errors import SanaCheckpointError, SanaInputError
from sana.cli import main, read_image, write_png
from sana.png import read_png_text
from sana.provenance import read_record
from sana.pipeline import check_generation_inputs, check_sampling_values, generate
from sana.sampling import control_steps
from sana.text_encoder import COMPLEX_HUMAN_INSTRUCTION
from test_pipeline import ATOL, GEMMA_HIDDEN, LATENT_CHANNELS, PROMPTS, as_comfy, assert_images_match, build_tiny_dcae, dpm_scheduler
from tiny_gemma import build_tiny_gemma

SIZE = dict(caption_channels=GEMMA_HIDDEN, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, sample_size=16)


class Parts:
    """Ours and diffusers' text encoder, DC-AE, and per width a DiT and a ControlNet."""

    def __init__(self, root):
        self.root = root
        gemma = self.gemma_folder = build_tiny_gemma(root / "gemma", hidden_size=GEMMA_HIDDEN)
        self.tokenizer = AutoTokenizer.from_pretrained(str(gemma), local_files_only=True)
        self.ref_text_encoder = Gemma2Model.from_pretrained(str(gemma), local_files_only=True, attn_implementation="eager").eval()
        self.text_encoder = sana.load_text_encoder(gemma, attn_implementation="eager")
        self.ref_vae = build_tiny_dcae(root / "vae")
        self.dcae = load_dcae(root / "vae")
        self.refs, self.dits, self.controlnets = {}, {}, {}
        for seed, width in enumerate(WIDTHS):
            controlnet = random_controlnet(width, seed=seed, **SIZE)
            base = random_base(controlnet, seed=10 + seed)
            controlnet.save_pretrained(root / f"controlnet_{width}")
            base.save_pretrained(root / f"dit_{width}")
            self.refs[width] = (base, controlnet)
            self.dits[width] = sana.load_dit(root / f"dit_{width}")
            self.controlnets[width] = sana.load_controlnet(root / f"controlnet_{width}")

    def reference(self, width: str, scheduler=None) -> SanaControlNetPipeline:
        base, controlnet = self.refs[width]
        pipe = SanaControlNetPipeline(
            tokenizer=self.tokenizer, text_encoder=self.ref_text_encoder, vae=self.ref_vae, transformer=base,
            controlnet=controlnet, scheduler=scheduler if scheduler is not None else dpm_scheduler(),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(self, layout: str = "600m", **kwargs) -> torch.Tensor:
        kwargs.setdefault("controlnet", self.controlnets[layout])
        return generate(dit=self.dits[layout], dcae=self.dcae, text_encoder=self.text_encoder, **kwargs)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp("controlnet_pipeline"))


def control_images(count: int = 1, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Edge-map-like control images [count, H, W, 3] in [0, 1]: random strokes on black."""
    g = torch.Generator().manual_seed(seed)
    strokes = (torch.rand(count, height, width, 1, generator=g) > 0.8).float()
    return strokes.expand(-1, -1, -1, 3).contiguous()


def diffusers_control(images: torch.Tensor) -> torch.Tensor:
    """Our [B, H, W, 3] in [0, 1] as the tensor diffusers' pipeline takes as is: [B, 3, H, W] in [-1, 1]."""
    return images.movedim(-1, 1) * 2 - 1


@pytest.mark.parametrize("layout", list(WIDTHS))
def test_matches_sana_controlnet_pipeline(parts, layout):
    """Flow-DPM-Solver with CFG against a negative prompt, a conditioning scale, one control image."""
    image = control_images()
    expected = parts.reference(layout)(
        prompt=PROMPTS[0], negative_prompt="blurry", num_inference_steps=3, guidance_scale=4.5, height=64, width=64,
        generator=torch.Generator().manual_seed(0), use_resolution_binning=False, output_type="pt",
        complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION), control_image=diffusers_control(image),
        controlnet_conditioning_scale=0.8,
    ).images
    ours = parts.generate(
        layout, prompt=PROMPTS[0], negative_prompt="blurry", steps=3, guidance_scale=4.5, height=64, width=64, seed=0,
        resolution_binning=False, control_image=image, control_scale=0.8,
    )
    assert_images_match(ours, expected)
    plain = parts.generate(layout, prompt=PROMPTS[0], negative_prompt="blurry", steps=3, guidance_scale=4.5, height=64,
                           width=64, seed=0, resolution_binning=False, controlnet=None)
    assert (ours - plain).abs().max() > 1e-2  # the ControlNet changed the image: the comparison proves something


def test_matches_with_a_control_image_per_prompt_and_flow_euler(parts):
    """Two prompts, each with its own control image; Flow-Euler; no CFG (guidance 1)."""
    images = torch.cat([control_images(seed=1), control_images(seed=2)])
    expected = parts.reference("1600m", scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))(
        prompt=PROMPTS, num_inference_steps=3, guidance_scale=1.0, height=64, width=64,
        generator=torch.Generator().manual_seed(1), use_resolution_binning=False, output_type="pt",
        control_image=diffusers_control(images),
    ).images
    ours = parts.generate(
        "1600m", prompt=PROMPTS, solver="flow_euler", steps=3, guidance_scale=1.0, height=64, width=64, seed=1,
        resolution_binning=False, control_image=images,
    )
    assert_images_match(ours, expected)


def test_scale_zero_is_exactly_no_controlnet(parts):
    kwargs = dict(prompt=PROMPTS[0], steps=2, height=64, width=64, seed=3, resolution_binning=False)
    plain = parts.generate(controlnet=None, **kwargs)
    assert torch.equal(parts.generate(control_image=control_images(), control_scale=0.0, **kwargs), plain)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_control_acts_on_the_steps_between_start_and_end(parts):
    """diffusers' rule for control_guidance_start/end: of 4 steps, [0, 0.5] is steps 0-1 and
    [0.5, 1] steps 2-3; the ControlNet runs only there, and the image lies between none and all."""
    assert control_steps(4, 0.0, 0.5) == range(0, 2)
    assert control_steps(4, 0.5, 1.0) == range(2, 4)
    assert control_steps(20, 0.0, 1.0) == range(20) and control_steps(3, 0.4, 0.6) == range(0)
    controlnet = copy.deepcopy(parts.controlnets["600m"])
    calls = count_calls(controlnet)
    kwargs = dict(prompt=PROMPTS[0], steps=4, height=64, width=64, seed=4, resolution_binning=False, control_image=control_images())
    first_half = parts.generate(controlnet=controlnet, control_end=0.5, **kwargs)
    assert len(calls) == 2
    full = parts.generate(controlnet=controlnet, **kwargs)
    none = parts.generate(controlnet=None, **{k: v for k, v in kwargs.items() if k != "control_image"})
    assert (first_half - full).abs().max() > 1e-3 and (first_half - none).abs().max() > 1e-3


def test_one_control_image_serves_the_batch_and_img2img_and_pag_combine(parts):
    kwargs = dict(prompt=PROMPTS[0], steps=3, height=64, width=64, seed=5, resolution_binning=False, batch_size=2,
                  pag_scale=2.0, pag_layers=[1], image=control_images(seed=9), strength=0.7)
    one = parts.generate(control_image=control_images(), **kwargs)
    two = parts.generate(control_image=control_images().expand(2, -1, -1, -1), **kwargs)
    assert one.shape == (2, 64, 64, 3)
    torch.testing.assert_close(one, two, rtol=0, atol=ATOL)  # a batch-2 encode rounds differently
    with pytest.raises(SanaInputError, match="got 3 control_images for a batch of 2"):
        parts.generate(control_image=control_images(3), **kwargs)


def test_compiled_step_matches_eager(parts, monkeypatch):
    """`compile_model` with a ControlNet on part of the steps: one graph with the ControlNet and
    one without, each traced with fullgraph and never recompiled across the steps."""
    import torch._dynamo

    compiled, torch_compile = [], torch.compile

    def compile_eager(fn, **options):
        assert options["fullgraph"]
        compiled.append(fn)
        return torch_compile(fn, backend="eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(torch, "compile", compile_eager)
    torch._dynamo.reset()
    kwargs = dict(prompt=PROMPTS, steps=4, guidance_scale=4.5, height=64, width=64, seed=6, resolution_binning=False,
                  control_image=control_images(), control_start=0.25)
    with torch._dynamo.config.patch(error_on_recompile=True):
        ours = parts.generate(compile_model=True, **kwargs)
    assert len(compiled) == 2
    torch.testing.assert_close(ours, parts.generate(**kwargs), rtol=0, atol=ATOL)  # padded vs trimmed caption


def sprint_dit(tmp_path, width: str):
    torch.manual_seed(0)
    layout = {k: v for k, v in WIDTHS[width].items()}
    ref = randomize_at_trained_scale(SanaTransformer2DModel(
        **SIZE, **layout, num_layers=3, qk_norm="rms_norm_across_heads", guidance_embeds=True).eval())
    ref.save_pretrained(tmp_path)
    return sana.load_dit(tmp_path)


def test_bad_requests_fail_before_any_compute(parts, tmp_path):
    request = dict(dit=parts.dits["600m"], dcae=parts.dcae, text_encoder=parts.text_encoder, prompt="x", height=64,
                   width=64, resolution_binning=False)
    controlnet, image = parts.controlnets["600m"], control_images()
    cases = [
        (dict(controlnet=controlnet), SanaInputError, "controlnet needs control_image"),
        (dict(control_image=image), SanaInputError, "control_image needs controlnet"),
        (dict(controlnet=controlnet, control_image=image, control_scale=float("nan")), SanaInputError, "control_scale"),
        (dict(controlnet=controlnet, control_image=image, control_scale=101.0), SanaInputError, "control_scale"),
        (dict(controlnet=controlnet, control_image=image, control_start=0.6, control_end=0.6), SanaInputError,
         "control_start 0.6 must be below control_end 0.6"),
        (dict(controlnet=controlnet, control_image=image * 2), SanaInputError, r"control_image values must be finite and in \[0, 1\]"),
        (dict(controlnet=parts.controlnets["1600m"], control_image=image), SanaCheckpointError, "has hidden_size 140, the DiT"),
        (dict(controlnet=parts.dits["600m"], control_image=image), SanaInputError, "controlnet must be a SanaControlNet"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            check_generation_inputs(**request, **kwargs)
    deep = sana.SanaControlNet(parts.controlnets["600m"].config.replace(depth=3))
    with pytest.raises(SanaCheckpointError, match=r"copies 3 blocks, but the DiT \(custom\) has only 3"):
        check_generation_inputs(**request, controlnet=deep, control_image=image)
    with pytest.raises(SanaInputError, match="a ControlNet needs a flow solver"):
        check_generation_inputs(**{**request, "dit": sprint_dit(tmp_path, "600m")}, controlnet=controlnet, control_image=image)
    with pytest.raises(SanaInputError, match="--control-scale"):
        check_sampling_values(control_scale=-1.0, names={"control_scale": "--control-scale"})


def test_command_line_writes_what_generate_returns(parts, tmp_path, capsys):
    """`python -m sana generate --controlnet FILE --control-image IMG --control-scale ...`."""
    write_png(tmp_path / "edges.png", control_images()[0])
    common = ["generate", "--dit", str(parts.root / "dit_600m"), "--vae", str(parts.root / "vae"), "--text-encoder",
              str(parts.gemma_folder), "--width", "64", "--height", "64", "--no-binning", "--seed", "5", "--device", "cpu",
              "--steps", "2", "--prompt", PROMPTS[0]]
    control = ["--controlnet", str(parts.root / "controlnet_600m"), "--control-image", str(tmp_path / "edges.png")]
    assert main([*common, *control, "--control-scale", "0.8", "--control-end", "0.5", "--out", str(tmp_path / "out.png")]) == 0
    expected = parts.generate(prompt=PROMPTS[0], steps=2, height=64, width=64, seed=5, resolution_binning=False,
                              control_image=control_images(), control_scale=0.8, control_end=0.5)
    assert torch.equal(read_image(tmp_path / "out.png"), (expected * 255).round() / 255)
    capsys.readouterr()
    for extra, message in (([control[0], control[1]], "--controlnet and --control-image go together"),
                           ([*control, "--control-scale", "-1"], "--control-scale")):
        assert main([*common, *extra, "--out", str(tmp_path / "bad.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "bad.png").exists()


def test_record_names_the_controlnet_and_replay_uses_it(parts, tmp_path, capsys):
    """The PNG's record carries the ControlNet (hash) and the control image (hash) with the
    control settings; --replay makes the same pixels from them, and refuses other files."""
    write_png(tmp_path / "edges.png", control_images()[0])
    out = tmp_path / "out.png"
    assert main(["generate", "--dit", str(parts.root / "dit_600m"), "--vae", str(parts.root / "vae"), "--text-encoder",
                 str(parts.gemma_folder), "--width", "64", "--height", "64", "--no-binning", "--seed", "5", "--device", "cpu",
                 "--steps", "2", "--prompt", PROMPTS[0], "--controlnet", str(parts.root / "controlnet_600m"),
                 "--control-image", str(tmp_path / "edges.png"), "--control-scale", "0.8", "--control-end", "0.5",
                 "--out", str(out)]) == 0
    record = read_record(out)
    assert (record["request"]["control_scale"], record["request"]["control_start"], record["request"]["control_end"]) == (0.8, 0.0, 0.5)
    assert record["controlnet"]["name"] == "controlnet_600m" and len(record["controlnet"]["sha256"]) == 64
    assert record["control_image"]["path"] == str(tmp_path / "edges.png")
    assert "ControlNet: controlnet_600m" in read_png_text(out)["parameters"]
    assert "Control scale: 0.8" in read_png_text(out)["parameters"]

    capsys.readouterr()
    assert main(["generate", "--replay", str(out), "--device", "cpu"]) == 0
    assert "identical pixels" in capsys.readouterr().err
    assert torch.equal(read_image(tmp_path / "out-replay.png"), read_image(out))

    # Another control image, another ControlNet, or none where one was recorded: refused, named.
    write_png(tmp_path / "other.png", control_images(seed=1)[0])
    cases = [
        (["--control-image", str(tmp_path / "other.png")], "is not the control image"),
        (["--controlnet", str(parts.root / "controlnet_1600m")], "give that file with --controlnet"),
        (["--controlnet", str(tmp_path / "missing")], "--controlnet .*missing does not exist"),
    ]
    for extra, message in cases:
        assert main(["generate", "--replay", str(out), "--device", "cpu", "--out", str(tmp_path / "bad.png"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "bad.png").exists()
    (tmp_path / "edges.png").rename(tmp_path / "moved.png")
    assert main(["generate", "--replay", str(out), "--device", "cpu", "--out", str(tmp_path / "bad.png")]) == 2
    assert "give it with --control-image" in capsys.readouterr().err
    assert main(["generate", "--replay", str(out), "--device", "cpu", "--out", str(tmp_path / "moved-replay.png"),
                 "--control-image", str(tmp_path / "moved.png")]) == 0
    assert torch.equal(read_image(tmp_path / "moved-replay.png"), read_image(out))
    assert read_record(tmp_path / "moved-replay.png")["control_image"]["path"] == str(tmp_path / "moved.png")


def _batch_command(parts, tmp_path, prompts: str, *extra: str) -> list[str]:
    (tmp_path / "prompts.jsonl").write_text(prompts)
    return ["generate", "--dit", str(parts.root / "dit_600m"), "--vae", str(parts.root / "vae"), "--text-encoder",
            str(parts.gemma_folder), "--prompts", str(tmp_path / "prompts.jsonl"), "--out-dir", str(tmp_path / "out"),
            "--width", "64", "--height", "64", "--no-binning", "--steps", "2", "--seed", "3", "--device", "cpu", *extra]


def test_batch_mode_steers_each_item_with_its_control_image(parts, tmp_path, capsys):
    """JSONL items name their control image (relative to the prompts file) or take --control-image;
    items are batched with control images of one size; each image is its item made alone, its
    record carries the ControlNet and the control image, and a rerun skips them until a control
    image changes."""
    from sana.batch import read_items

    write_png(tmp_path / "a.png", control_images(seed=1)[0])
    write_png(tmp_path / "b.png", control_images(seed=2, height=48, width=48)[0])
    write_png(tmp_path / "default.png", control_images(seed=3)[0])
    lines = [{"prompt": PROMPTS[0], "control_image": "a.png"}, {"prompt": PROMPTS[1]},
             {"prompt": PROMPTS[0], "control_image": "b.png", "control_scale": 0.5}, {"prompt": PROMPTS[1], "control_end": 0.5}]
    command = _batch_command(parts, tmp_path, "".join(json.dumps(line) + "\n" for line in lines),
                             "--controlnet", str(parts.root / "controlnet_600m"), "--control-image",
                             str(tmp_path / "default.png"), "--batch-size", "4")
    assert read_items(tmp_path / "prompts.jsonl")[0].control_image == str(tmp_path / "a.png")
    assert main(command) == 0
    settings = [("a.png", 1.0, 1.0), ("default.png", 1.0, 1.0), ("b.png", 0.5, 1.0), ("default.png", 1.0, 0.5)]
    for index, (line, (image, scale, end)) in enumerate(zip(lines, settings)):
        out = tmp_path / "out" / f"{index:06d}.png"
        alone = parts.generate(prompt=line["prompt"], steps=2, height=64, width=64, seed=3 + index, resolution_binning=False,
                               control_image=read_image(tmp_path / image), control_scale=scale, control_end=end)
        torch.testing.assert_close(read_image(out), (alone * 255).round() / 255, rtol=0, atol=1 / 255 + 1e-6)
        record = read_record(out)
        assert record["control_image"]["path"] == str(tmp_path / image)
        assert record["controlnet"]["name"] == "controlnet_600m"
        assert (record["request"]["control_scale"], record["request"]["control_end"]) == (scale, end)
    capsys.readouterr()
    assert main(command) == 0
    assert "done 0, skipped 4" in capsys.readouterr().err
    write_png(tmp_path / "b.png", control_images(seed=4, height=48, width=48)[0])
    assert main(command) == 1
    assert "another control image" in (tmp_path / "out" / "index.jsonl").read_text()
    assert main(["generate", "--replay", str(tmp_path / "out" / "000000.png"), "--device", "cpu"]) == 0


@pytest.mark.parametrize(("prompts", "extra", "message"), [
    ('{"prompt": "a", "control_image": "x.png"}\n{"prompt": "b"}\n{"prompt": "c", "control_scale": 2}\n', [],
     r"line\(s\) 1, 3 steer a ControlNet .*give --controlnet"),
    ('{"prompt": "a", "control_image": "x.png"}\n{"prompt": "b"}\n', ["--controlnet", "CN"],
     r'line\(s\) 2 have no "control_image" for --controlnet'),
    ('{"prompt": "a", "control_image": "missing.png"}\n', ["--controlnet", "CN"],
     r"1 control image\(s\) not found: line 1: .*missing\.png"),
    ('{"prompt": "a", "control_image": 3}\n', ["--controlnet", "CN"], r'line 1: "control_image" must be a file path'),
    ('{"prompt": "a", "control_start": 2}\n', ["--controlnet", "CN"], r"line 1: .*control_start"),
    ("a\n", ["--control-image", "x.png"], "--controlnet and --control-image go together"),
])
def test_batch_mode_control_errors_come_before_loading(parts, tmp_path, capsys, prompts, extra, message):
    extra = [str(parts.root / "controlnet_600m") if value == "CN" else value for value in extra]
    (tmp_path / "x.png").write_bytes(b"")  # never read: the checks come first
    assert main(_batch_command(parts, tmp_path, prompts, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()
