"""`sana.generate` end to end against diffusers' pipelines on the same tiny random weights.

Components: a tiny Gemma-2 with an offline-trained tokenizer (`tiny_gemma.py`), random
diffusers `SanaTransformer2DModel`s (`dit_checkpoints.random_reference`) and a random 4-stage
`AutoencoderDC` (compression 8, so a 64x64 image has 8x8 latents), each saved and read back
through our loaders. Both sides run in fp32 from the same seed and are compared as images.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPAGPipeline,
    SanaPipeline,
    SanaSprintImg2ImgPipeline,
    SanaSprintPipeline,
    SCMScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoTokenizer, Gemma2Model

import sana
from dit_checkpoints import random_reference
from sana.dcae_io import load_dcae
from sana.errors import SanaCheckpointError, SanaInputError
from sana import pipeline, sampling
from sana.pipeline import check_generation_inputs, generate, latents_to_images
from sana.dit import perturbed_self_attention
from sana.samplers import draw_noise, flow_dpm_solver, flow_euler, guided_velocity, trigflow_sampler
from sana.schedules import flow_dpm_schedule, flow_euler_schedule, trigflow_schedule
from sana.text_encoder import COMPLEX_HUMAN_INSTRUCTION
from tiny_gemma import build_tiny_gemma

# The project's end-to-end bar: images within 1e-4 of diffusers' (in practice ~1e-6). Also the
# bar between two of our own paths that compute the same images with another float summation
# order (batch composition, padded vs trimmed caption, traced vs eager): fp32 reductions reordered
# by the CPU's kernels (AVX2, AVX-512, AMX pick different blockings per shape) move each op by a
# few ulps, which the DiT and DC-AE amplify to ~1e-6..1e-5 on [0, 1] pixels; a real fault (rows
# that interact, a mask on the wrong row, other noise) moves them by 1e-2 or more.
ATOL = 1e-4
LATENT_CHANNELS = 8
GEMMA_HIDDEN = 32
PROMPTS = ["A Painting of a Squirrel eating a Burger.", "a cute robot holding a red balloon"]


def build_tiny_dcae(folder: Path, seed: int = 0) -> AutoencoderDC:
    """A random diffusers DC-AE with SANA's block types at 4 stages (compression 8), saved to `folder`."""
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        latent_channels=LATENT_CHANNELS,
        attention_head_dim=8,
        encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        encoder_block_out_channels=[8, 16, 16, 32],
        decoder_block_out_channels=[8, 16, 16, 32],
        encoder_layers_per_block=[1, 1, 1, 1],
        decoder_layers_per_block=[1, 1, 1, 1],
        encoder_qkv_multiscales=[[], [], [5], [5]],
        decoder_qkv_multiscales=[[], [], [5], [5]],
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    with torch.no_grad():  # move off diffusers' zero/one inits so every weight matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae.save_pretrained(str(folder))
    return vae


def build_tiny_dit(folder: Path, variant: str = "sana", seed: int = 0, **overrides):
    """A random diffusers SANA transformer sized for the tiny Gemma and DC-AE, saved to `folder`."""
    ref = random_reference(
        variant,
        seed,
        caption_channels=GEMMA_HIDDEN,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        **{"sample_size": 16, **overrides},
    )
    ref.save_pretrained(str(folder))
    return ref


class Components:
    """Our loaded parts and the diffusers objects they were read from."""

    def __init__(self, root: Path):
        self.gemma_folder = build_tiny_gemma(root / "gemma", hidden_size=GEMMA_HIDDEN)
        self.vae_folder, self.dit_folder, self.sprint_folder = root / "vae", root / "dit", root / "sprint"
        self.ref_vae = build_tiny_dcae(self.vae_folder)
        self.ref_dit = build_tiny_dit(self.dit_folder)
        self.ref_sprint = build_tiny_dit(self.sprint_folder, "sana-sprint", seed=1, sample_size=32)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.gemma_folder), local_files_only=True)
        self.ref_text_encoder = Gemma2Model.from_pretrained(
            str(self.gemma_folder), local_files_only=True, attn_implementation="eager"
        ).eval()
        # Eager attention on both sides: the one backend that applies Gemma-2's soft-capping.
        self.text_encoder = sana.load_text_encoder(self.gemma_folder, attn_implementation="eager")
        self.dit = sana.load_dit(self.dit_folder)
        self.sprint = sana.load_dit(self.sprint_folder)
        self.dcae = load_dcae(self.vae_folder)

    def reference(self, pipeline_class, transformer=None, scheduler=None, **kwargs):
        pipe = pipeline_class(
            tokenizer=self.tokenizer,
            text_encoder=self.ref_text_encoder,
            vae=self.ref_vae,
            transformer=transformer if transformer is not None else self.ref_dit,
            scheduler=scheduler if scheduler is not None else dpm_scheduler(),
            **kwargs,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(self, **kwargs) -> torch.Tensor:
        kwargs.setdefault("dit", self.dit)
        return generate(dcae=self.dcae, text_encoder=self.text_encoder, **kwargs)


def dpm_scheduler(shift: float = 3.0) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Components:
    return Components(tmp_path_factory.mktemp("pipeline_parts"))


def as_comfy(images_bchw: torch.Tensor) -> torch.Tensor:
    """diffusers' output_type="pt" [B, 3, H, W] -> ComfyUI's [B, H, W, 3]."""
    return images_bchw.movedim(1, -1).float()


def assert_images_match(ours: torch.Tensor, expected_bchw: torch.Tensor) -> None:
    expected = as_comfy(expected_bchw)
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    assert 0.0 <= ours.min() and ours.max() <= 1.0
    assert expected.std() > 0.01, "degenerate reference image: the comparison would prove nothing"
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------
# Parity with the diffusers pipelines


@pytest.mark.parametrize(("chi", "prompts", "copies"), [(True, PROMPTS, 1), (False, PROMPTS[:1], 2)])
def test_flow_dpm_solver_matches_sana_pipeline(parts, chi, prompts, copies):
    """CFG against a non-empty negative prompt; a batch of prompts, or several images of one.

    (Not several images of several prompts: diffusers then tiles the masks prompt-minor while
    the embeddings are prompt-major, pairing prompts with each other's masks;
    `test_batch_equals_one_prompt_at_a_time` pins our pairing instead.)
    """
    expected = parts.reference(SanaPipeline)(
        prompt=prompts,
        negative_prompt="blurry, low quality",
        num_images_per_prompt=copies,
        num_inference_steps=3,
        guidance_scale=4.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        use_resolution_binning=False,
        complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION) if chi else None,
        output_type="pt",
    ).images
    ours = parts.generate(
        prompt=prompts,
        negative_prompt="blurry, low quality",
        batch_size=copies,
        steps=3,
        guidance_scale=4.5,
        height=64,
        width=64,
        seed=0,
        resolution_binning=False,
        chi=chi,
    )
    assert_images_match(ours, expected)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_flow_euler_matches_sana_pipeline(parts, guidance_scale):
    expected = parts.reference(SanaPipeline, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))(
        prompt=PROMPTS[0],
        num_inference_steps=3,
        guidance_scale=guidance_scale,
        height=64,
        width=96,
        generator=torch.Generator().manual_seed(1),
        use_resolution_binning=False,
        output_type="pt",
    ).images
    ours = parts.generate(
        prompt=PROMPTS[0],
        solver="flow_euler",
        steps=3,
        guidance_scale=guidance_scale,
        height=64,
        width=96,
        seed=1,
        resolution_binning=False,
    )
    assert_images_match(ours, expected)


def test_resolution_binning_matches_sana_pipeline(parts):
    """64x96 asks for ratio 0.67: the DiT (sample_size 16) samples at the 512 table's 416x608
    bin, and the decoded image is resized and centre-cropped back to 64x96."""
    expected = parts.reference(SanaPipeline)(
        prompt=PROMPTS[1],
        num_inference_steps=2,
        height=64,
        width=96,
        generator=torch.Generator().manual_seed(2),
        output_type="pt",
    ).images
    seen = []
    ours = parts.generate(
        prompt=PROMPTS[1], steps=2, height=64, width=96, seed=2, callback=lambda i, n, x0: seen.append(x0.shape)
    )
    assert seen[0][-2:] == (416 // 8, 608 // 8)
    assert_images_match(ours, expected)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_pag_matches_sana_pag_pipeline(parts, guidance_scale):
    """PAG in block 1 of 2, with CFG (batch uncond|cond|perturbed) and without (cond|perturbed)."""
    expected = parts.reference(SanaPAGPipeline, pag_applied_layers=["transformer_blocks.1"])(
        prompt=PROMPTS[0],
        num_inference_steps=3,
        guidance_scale=guidance_scale,
        pag_scale=3.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
        use_resolution_binning=False,
        output_type="pt",
    ).images
    kwargs = dict(prompt=PROMPTS[0], steps=3, guidance_scale=guidance_scale, height=64, width=64, seed=3, resolution_binning=False)
    ours = parts.generate(pag_scale=3.0, pag_layers=[1], **kwargs)
    assert_images_match(ours, expected)
    # The perturbation is real and is switched off again afterwards.
    assert all(block.attn.identity_rows is None for block in parts.dit.blocks)
    assert (ours - parts.generate(pag_scale=3.0, pag_layers=[0], **kwargs)).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 2])
def test_sprint_matches_sana_sprint_pipeline(parts, steps):
    """TrigFlow picked automatically for a guidance-embedded DiT; per-step noise from the seed."""
    expected = parts.reference(SanaSprintPipeline, transformer=parts.ref_sprint, scheduler=SCMScheduler())(
        prompt=PROMPTS,
        num_inference_steps=steps,
        intermediate_timesteps=1.3 if steps == 2 else None,
        guidance_scale=4.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(4),
        use_resolution_binning=False,
        output_type="pt",
    ).images
    ours = parts.generate(
        dit=parts.sprint, prompt=PROMPTS, steps=steps, guidance_scale=4.5, height=64, width=64, seed=4, resolution_binning=False
    )
    assert_images_match(ours, expected)


def _input_image(batch: int = 1) -> torch.Tensor:
    """A smooth [B, 3, 64, 64] image in [0, 1] (a random one would be all high frequencies)."""
    g = torch.Generator().manual_seed(9)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)


def test_sprint_img2img_matches_sana_sprint_img2img_pipeline(parts):
    image = _input_image()
    expected = parts.reference(SanaSprintImg2ImgPipeline, transformer=parts.ref_sprint, scheduler=SCMScheduler())(
        prompt=PROMPTS[0],
        image=image,
        strength=0.5,
        num_inference_steps=4,
        intermediate_timesteps=None,
        guidance_scale=4.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(5),
        use_resolution_binning=False,
        output_type="pt",
    ).images
    ours = parts.generate(
        dit=parts.sprint,
        prompt=PROMPTS[0],
        image=as_comfy(image),
        strength=0.5,
        steps=4,
        height=64,
        width=64,
        seed=5,
        resolution_binning=False,
    )
    assert_images_match(ours, expected)


@pytest.mark.parametrize("solver", ["flow_dpm_solver", "flow_euler"])
def test_flow_img2img_matches_diffusers_components(parts, solver):
    """diffusers has no SANA flow img2img pipeline; the reference is its img2img recipe on its
    own components: get_timesteps cut, set_begin_index, add_noise / scale_noise, CFG loop."""
    steps, strength, batch = 5, 0.6, 2
    image = _input_image()
    pipe = parts.reference(SanaPipeline)
    with torch.no_grad():
        cond, cond_mask, uncond, uncond_mask = pipe.encode_prompt(
            PROMPTS[0], True, num_images_per_prompt=batch, device=torch.device("cpu"),
            complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION),
        )
        clean = parts.ref_vae.encode(image * 2 - 1).latent * parts.ref_vae.config.scaling_factor
        scheduler = dpm_scheduler() if solver == "flow_dpm_solver" else FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        skip = int(max(steps - min(steps * strength, steps), 0))
        timesteps = scheduler.timesteps[skip:]
        scheduler.set_begin_index(skip)
        noise = randn_tensor((batch, LATENT_CHANNELS, 8, 8), generator=torch.Generator().manual_seed(6))
        first = timesteps[:1].repeat(batch)
        if solver == "flow_dpm_solver":
            latents = scheduler.add_noise(clean.expand(batch, -1, -1, -1), noise, first)
        else:
            latents = scheduler.scale_noise(clean.expand(batch, -1, -1, -1), first, noise)
        for t in timesteps:
            v = parts.ref_dit(
                torch.cat([latents] * 2),
                encoder_hidden_states=torch.cat([uncond, cond]),
                encoder_attention_mask=torch.cat([uncond_mask, cond_mask]),
                timestep=t.expand(2 * batch),
                return_dict=False,
            )[0].float()
            v_uncond, v_cond = v.chunk(2)
            latents = scheduler.step(v_uncond + 4.5 * (v_cond - v_uncond), t, latents, return_dict=False)[0]
        expected = (parts.ref_vae.decode(latents / parts.ref_vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    ours = parts.generate(
        prompt=PROMPTS[0], batch_size=batch, image=as_comfy(image), strength=strength, solver=solver,
        steps=steps, height=64, width=64, seed=6, resolution_binning=False,
    )
    assert_images_match(ours, expected)


# ---------------------------------------------------------------------------------------
# Properties of generate itself


def test_seed_latents_and_callback(parts):
    kwargs = dict(prompt=PROMPTS[0], steps=2, height=64, width=64, resolution_binning=False)
    calls = []
    seeded = parts.generate(seed=7, callback=lambda i, n, x0: calls.append((i, n, x0.clone())), **kwargs)
    noise = draw_noise((1, LATENT_CHANNELS, 8, 8), torch.Generator().manual_seed(7))
    injected = parts.generate(seed=123, latents=noise, **kwargs)
    assert torch.equal(injected, seeded)  # the latents are the noise; the seed draws nothing else
    injected.mul_(0.5)  # an ordinary tensor, not an inference-mode one: callers may edit it in place
    assert not torch.allclose(parts.generate(seed=8, **kwargs), seeded, atol=1e-3)
    assert [(i, n) for i, n, _ in calls] == [(0, 2), (1, 2)]
    # Flow-DPM-Solver's last step returns that step's x0, so the preview of the last step is the image.
    assert torch.equal(latents_to_images(parts.dcae, calls[-1][2], 64, 64), seeded)


def test_batch_equals_one_prompt_at_a_time(parts):
    """Images are prompt-major, each prompt with its own mask, and rows do not interact."""
    kwargs = dict(steps=2, height=64, width=64, resolution_binning=False)
    noise = draw_noise((4, LATENT_CHANNELS, 8, 8), torch.Generator().manual_seed(11))
    batched = parts.generate(prompt=PROMPTS, batch_size=2, latents=noise, **kwargs)
    for i, prompt in enumerate(PROMPTS):
        alone = parts.generate(prompt=prompt, batch_size=2, latents=noise[2 * i : 2 * i + 2], **kwargs)
        torch.testing.assert_close(batched[2 * i : 2 * i + 2], alone, rtol=0, atol=ATOL)  # another batch composition


def test_one_image_serves_the_whole_batch(parts):
    kwargs = dict(prompt=PROMPTS[0], steps=2, strength=0.5, height=64, width=64, seed=3, resolution_binning=False)
    one = parts.generate(image=as_comfy(_input_image()), batch_size=2, **kwargs)
    two = parts.generate(image=as_comfy(_input_image()).expand(2, -1, -1, -1), batch_size=2, **kwargs)
    assert one.shape == (2, 64, 64, 3)
    torch.testing.assert_close(one, two, rtol=0, atol=ATOL)  # a batch-2 encode rounds differently
    assert not torch.allclose(one[0], one[1], atol=1e-3)  # different noise per image
    with pytest.raises(SanaInputError, match="got 3 images for a batch of 2"):
        parts.generate(image=as_comfy(_input_image(3)), batch_size=2, **kwargs)


def test_flow_shift_defaults_to_the_dit_config(parts):
    """The DiT config owns the default flow shift, as the nodes and the trainer read it: a custom
    config whose shift differs from its release's rule (3.0 at this sample size) samples with its own."""
    custom = copy.deepcopy(parts.dit)
    custom.config = custom.config.replace(flow_shift=5.0)
    kwargs = dict(dit=custom, prompt=PROMPTS[0], steps=3, height=64, width=64, seed=4, resolution_binning=False)
    plan = check_generation_inputs(dcae=parts.dcae, text_encoder=parts.text_encoder, **kwargs)
    assert plan.flow_shift == 5.0
    assert check_generation_inputs(dcae=parts.dcae, text_encoder=parts.text_encoder, flow_shift=2.0, **kwargs).flow_shift == 2.0
    default = parts.generate(**kwargs)
    assert torch.equal(default, parts.generate(flow_shift=5.0, **kwargs))  # the same path with the same shift
    assert not torch.allclose(default, parts.generate(flow_shift=3.0, **kwargs), atol=1e-3)


def test_plan_settles_branches_strength_and_shift(parts):
    base = dict(dcae=parts.dcae, text_encoder=parts.text_encoder, prompt=PROMPTS[0], height=64, width=64,
                resolution_binning=False)
    assert check_generation_inputs(dit=parts.dit, **base).branches == ("uncond", "cond")
    pag = check_generation_inputs(dit=parts.dit, guidance_scale=1.0, pag_scale=2.0, **base)
    assert pag.branches == ("cond", "perturbed") and pag.pag_layers == (0,)
    sprint = check_generation_inputs(dit=parts.sprint, **base)
    assert sprint.solver == "trigflow" and sprint.branches == ()
    # Without an image, strength does not cut the schedule.
    assert check_generation_inputs(dit=parts.dit, strength=0.5, **base).strength == 1.0
    image = as_comfy(_input_image())
    img2img = check_generation_inputs(dit=parts.dit, strength=0.5, steps=10, image=image, **base)
    assert (img2img.strength, img2img.start_step) == (0.5, 5)


@pytest.mark.parametrize("sprint", [False, True])
def test_the_stages_called_one_by_one_are_generate(parts, sprint):
    """`generate` is its stages and nothing else: calling them in order gives the same images
    (the same code path, hence exactly), img2img and CFG + PAG included."""
    dit = parts.sprint if sprint else parts.dit
    image = as_comfy(_input_image())
    request = dict(dit=dit, dcae=parts.dcae, text_encoder=parts.text_encoder, prompt=PROMPTS, steps=3, height=64, width=64,
                   seed=6, resolution_binning=False, image=image, strength=0.7, guidance_scale=4.5,
                   pag_scale=0.0 if sprint else 2.0, pag_layers=None if sprint else [1])
    expected = generate(**request)

    plan = check_generation_inputs(**request)
    with torch.no_grad(), pipeline.guided_pag(dit, plan):
        negative = "" if "uncond" in plan.branches else None
        text = pipeline.encode_prompts(parts.text_encoder, plan.prompts, copies=1, negative_prompt=negative, chi=True,
                                       device=dit.device)
        clean = pipeline.image_latents(parts.dcae, image, plan, dit.device)
        generator = pipeline.seeded_generator(6)
        noise = pipeline.initial_noise(plan, generator, None, dit.device)
        if sprint:
            angles = sampling.trigflow_angles(3, plan.strength)
            final = pipeline.denoise_trigflow(dit, text, noise, angles, generator, guidance_scale=4.5, image_latents=clean)
        else:
            schedule = sampling.flow_schedule(plan.solver, 3, plan.flow_shift, plan.strength)
            final = pipeline.denoise_flow(dit, text, noise, schedule, solver=plan.solver, branches=plan.branches,
                                          guidance_scale=4.5, pag_scale=2.0, image_latents=clean)
        images = sampling.latents_to_images(parts.dcae, final, plan.height, plan.width)
    assert torch.equal(images, expected)


def test_latents_to_images_takes_raw_or_scaled_latents(parts):
    """One way from latents to [0, 1] images for the pipeline (DiT-space latents) and the nodes
    (raw DC-AE latents): dividing by the scaling factor is the only difference."""
    raw = torch.randn(2, LATENT_CHANNELS, 8, 6, generator=torch.Generator().manual_seed(2))
    from_raw = latents_to_images(parts.dcae, raw, scaled=False)
    # raw * f / f is raw to within one rounding of each latent; the DC-AE keeps it below ATOL.
    torch.testing.assert_close(latents_to_images(parts.dcae, raw * parts.dcae.scaling_factor), from_raw, rtol=0, atol=ATOL)
    assert from_raw.shape == (2, 64, 48, 3) and from_raw.dtype == torch.float32 and from_raw.device.type == "cpu"
    assert 0 <= from_raw.min() and from_raw.max() <= 1 and from_raw.std() > 0.01
    with torch.no_grad():
        decoded = parts.dcae.decode(raw)
    assert torch.equal(from_raw, (decoded.float() / 2 + 0.5).clamp(0, 1).movedim(1, -1))
    cropped = latents_to_images(parts.dcae, raw, 40, 48, scaled=False)  # covers 40x48, then centre-crops
    assert cropped.shape == (2, 40, 48, 3)


# ---------------------------------------------------------------------------------------
# Errors: each names both sides


def test_caption_channels_must_match_the_text_encoder(parts):
    dit = sana.SanaDiT(parts.dit.config.replace(caption_channels=2304))
    with pytest.raises(SanaCheckpointError, match=r"hidden size 32, but the DiT .* caption_channels 2304"):
        parts.generate(dit=dit, prompt="a cat", height=64, width=64, resolution_binning=False)


def test_latent_channels_must_match_the_dit(parts):
    dit = sana.SanaDiT(parts.dit.config.replace(in_channels=32, out_channels=32))
    with pytest.raises(SanaCheckpointError, match=r"DC-AE has 8 latent channels, but the DiT .* has 32 input channels"):
        parts.generate(dit=dit, prompt="a cat", height=64, width=64, resolution_binning=False)


def test_size_must_fit_the_dcae_without_binning(parts):
    with pytest.raises(SanaInputError, match=r"100x64 .* not a multiple of 8 px: the DC-AE compresses by 8 and the DiT patch is 1"):
        parts.generate(prompt="a cat", height=100, width=64, resolution_binning=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(solver="trigflow"), "'trigflow' needs a SANA-Sprint DiT"),
        (dict(solver="euler"), "unknown solver 'euler'"),
        (dict(pag_scale=2.0, pag_layers=[5]), r"PAG layers \[5\] do not exist: this DiT has blocks 0..1"),
        (dict(latents=torch.zeros(1, 8, 4, 4)), r"latents have shape \[1, 8, 4, 4\], but this request needs \[1, 8, 8, 8\]"),
        (dict(image=torch.rand(1, 64, 64, 3), strength=0.0), "strength 0.0 with 2 steps leaves no step to run"),
        (dict(prompt=[]), "non-empty list"),
    ],
)
def test_bad_requests_are_named(parts, kwargs, message):
    request = {**dict(prompt="a cat", steps=2, height=64, width=64, resolution_binning=False), **kwargs}
    with pytest.raises(SanaInputError, match=message):
        parts.generate(**request)
    assert all(block.attn.identity_rows is None for block in parts.dit.blocks)


def test_sprint_dit_refuses_flow_solvers_and_pag(parts):
    request = dict(dit=parts.sprint, prompt="a cat", height=64, width=64, resolution_binning=False)
    with pytest.raises(SanaInputError, match="SANA-Sprint model .* samples only with 'trigflow', not 'flow_euler'"):
        parts.generate(solver="flow_euler", **request)
    with pytest.raises(SanaInputError, match="TrigFlow sampler has no PAG"):
        parts.generate(pag_scale=2.0, **request)


@pytest.mark.parametrize("sprint", [False, True])
def test_compiled_step_matches_eager(parts, sprint, monkeypatch):
    """`compile_model` traces each step (CFG + PAG batch, or Sprint's guidance) as one graph:
    `fullgraph=True` fails on any graph break. The eager backend keeps CI fast; it runs the
    traced graph, so equal images mean the graph computes the step."""
    import torch._dynamo

    compiled, torch_compile = [], torch.compile

    def compile_eager(fn, **options):
        assert options["fullgraph"]
        compiled.append(fn)
        return torch_compile(fn, backend="eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(torch, "compile", compile_eager)
    torch._dynamo.reset()
    if sprint:
        kwargs = dict(dit=parts.sprint, prompt=PROMPTS, steps=2, guidance_scale=4.5)
    else:
        kwargs = dict(prompt=PROMPTS, steps=3, guidance_scale=4.5, pag_scale=2.0, pag_layers=[1])
    kwargs.update(height=64, width=64, seed=5, resolution_binning=False)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph serves every step
        ours = parts.generate(compile_model=True, **kwargs)
        # ... and every prompt: the caption keeps its padded length instead of being trimmed.
        other = parts.generate(compile_model=True, **{**kwargs, "prompt": [p + " at dusk, long shot" for p in PROMPTS]})
    assert len(compiled) == 2
    # Against the trimmed eager run: the padded keys change only the summation order.
    torch.testing.assert_close(ours, parts.generate(**kwargs), rtol=0, atol=ATOL)
    assert not torch.allclose(ours, other, atol=1e-3)


def test_sampling_loop_never_syncs_with_the_host(parts):
    """Every step on the meta device, which refuses `.item()`, `bool()` and `nonzero()`: the
    loop of each sampler, CFG + PAG batching and the DiT forward read nothing back."""
    dit = copy.deepcopy(parts.dit).to("meta")
    sprint = copy.deepcopy(parts.sprint).to("meta")
    latents = torch.randn(2, LATENT_CHANNELS, 8, 8, device="meta")
    context = torch.randn(6, 7, dit.config.caption_channels, device="meta")
    mask = torch.ones(6, 7, device="meta")
    with pytest.raises(RuntimeError, match="meta"):  # the per-step trimming would have synced
        dit(latents.repeat(3, 1, 1, 1), torch.ones(6, device="meta"), context, mask)

    def model(x, t):
        return dit(x, t, context, mask, trim_context=False)

    velocity = guided_velocity(model, guidance_scale=4.5, pag_scale=2.0, pag_adaptive_scale=0.1)
    with perturbed_self_attention(dit, [1], slice(4, 6)), torch.no_grad():
        for sampler, schedule in ((flow_dpm_solver, flow_dpm_schedule(4, 3.0)), (flow_euler, flow_euler_schedule(3, 3.0))):
            assert sampler(velocity, latents, schedule).device.type == "meta"

        def sprint_velocity(x, t):
            return sprint(x, t, context[:2], mask[:2], torch.full((2,), 4.5, device="meta"), trim_context=False)

        out = trigflow_sampler(sprint_velocity, latents, trigflow_schedule(2), generator=torch.Generator().manual_seed(0))
        assert out.device.type == "meta"


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on CPU")
def test_compiled_step_with_inductor_matches_eager():
    """The real compiler (inductor, C++ on CPU) on a CFG step of a tiny DiT: same velocity, and
    the second timestep reuses the graph."""
    import torch._dynamo

    from sana.pipeline import compiled_step

    config = sana.SanaDiTConfig(hidden_size=64, depth=2, cross_attention_heads=2, cross_attention_head_dim=32,
                                caption_channels=24, in_channels=8, out_channels=8)
    torch.manual_seed(0)
    dit = sana.SanaDiT(config).eval()
    context, mask = torch.randn(2, 5, 24), torch.ones(2, 5)
    mask[0, 3:] = 0
    velocity = guided_velocity(lambda x, t: dit(x, t, context, mask, trim_context=False), guidance_scale=4.5)
    x = torch.randn(1, 8, 8, 8)
    torch._dynamo.reset()
    step = compiled_step(velocity, "cpu")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for t in (999.0, 500.0):
            timestep = torch.full((1,), t)
            torch.testing.assert_close(step(x, timestep), velocity(x, timestep), rtol=1e-4, atol=2e-5)
