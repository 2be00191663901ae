"""Samplers against the diffusers schedulers stepping the same velocity function.

Two levels:
- a toy velocity (a fixed random channel-mixing map of x, a per-branch context term and a
  function of the timestep) driven through our solvers and through a loop over diffusers'
  `scheduler.step`, for many step counts and shifts;
- the real diffusers pipelines (SanaPipeline, SanaPAGPipeline, SanaSprintPipeline,
  SanaSprintImg2ImgPipeline) on a tiny random SanaTransformer2DModel with `output_type="latent"`,
  against our solvers driving the same transformer. This also pins the noise draw order and
  the batch layout.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPAGPipeline,
    SanaPipeline,
    SanaSprintImg2ImgPipeline,
    SanaSprintPipeline,
    SanaTransformer2DModel,
    SCMScheduler,
)
from diffusers.pipelines.pag.pag_utils import PAGMixin
from diffusers.utils.torch_utils import randn_tensor

from sana.errors import SanaInputError
from sana.samplers import (
    add_flow_noise,
    combine_guidance,
    draw_noise,
    flow_dpm_solver,
    flow_euler,
    guidance_branches,
    guided_velocity,
    trigflow_sampler,
    trigflow_start_latents,
)
from sana.schedules import (
    flow_dpm_schedule,
    flow_euler_schedule,
    img2img_start_step,
    trigflow_schedule,
)

CHANNELS, SIDE, BATCH = 4, 5, 2
# Tolerance for solver parity; the implementations use the same float32 operation order,
# so in practice the results are bitwise equal.
ATOL = 1e-6


class ToyModel:
    """A velocity model whose output depends on x, the timestep and a per-row context."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(CHANNELS, CHANNELS, generator=g) * 0.3
        self.contexts = {name: torch.randn(CHANNELS, 1, 1, generator=g) for name in ("uncond", "cond", "perturbed")}

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = timestep.float().view(-1, 1, 1, 1) / 1000
        return torch.einsum("oc,bchw->bohw", self.mix, x) + torch.cos(3 * t) * context + t * x

    def context(self, branches: tuple[str, ...], batch: int) -> torch.Tensor:
        return torch.cat([self.contexts[b].expand(batch, CHANNELS, 1, 1) for b in branches])


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _ours(solver, schedule, toy: ToyModel, latents, guidance_scale: float, pag_scale: float = 0.0):
    branches = guidance_branches(guidance_scale, pag_scale)
    context = toy.context(branches, BATCH)
    velocity = guided_velocity(lambda x, t: toy(x, t, context), guidance_scale=guidance_scale, pag_scale=pag_scale)
    return solver(velocity, latents, schedule)


def _diffusers_loop(scheduler, toy: ToyModel, latents, guidance_scale: float, timesteps=None):
    """What SanaPipeline's denoising loop does, with the toy model as the transformer."""
    cfg = guidance_scale > 1.0
    context = toy.context(("uncond", "cond") if cfg else ("cond",), BATCH)
    for t in scheduler.timesteps if timesteps is None else timesteps:
        model_input = torch.cat([latents] * 2) if cfg else latents
        v = toy(model_input, t.expand(model_input.shape[0]) * 1.0, context).float()
        if cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return latents


def _dpm_scheduler(shift: float) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)


@pytest.mark.parametrize("shift", [3.0, 6.0])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 14, 20, 50])
def test_flow_dpm_solver_matches_diffusers(steps, guidance_scale, shift):
    toy, noise = ToyModel(), _noise()
    scheduler = _dpm_scheduler(shift)
    scheduler.set_timesteps(steps)
    expected = _diffusers_loop(scheduler, toy, noise.clone(), guidance_scale)
    ours = _ours(flow_dpm_solver, flow_dpm_schedule(steps, shift), toy, noise.clone(), guidance_scale)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_flow_euler_matches_diffusers(steps, guidance_scale, shift):
    toy, noise = ToyModel(), _noise()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    expected = _diffusers_loop(scheduler, toy, noise.clone(), guidance_scale)
    ours = _ours(flow_euler, flow_euler_schedule(steps, shift), toy, noise.clone(), guidance_scale)
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


def test_guidance_scale_at_most_one_is_a_single_conditional_pass():
    # diffusers turns CFG on only for scale > 1; a scale of 0.5 must not extrapolate.
    toy, noise = ToyModel(), _noise()
    assert guidance_branches(0.5) == ("cond",)
    scheduler = _dpm_scheduler(3.0)
    scheduler.set_timesteps(6)
    expected = _diffusers_loop(scheduler, toy, noise.clone(), 0.5)
    ours = _ours(flow_dpm_solver, flow_dpm_schedule(6, 3.0), toy, noise.clone(), 0.5)
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("scheduler_kind", ["dpm", "euler"])
@pytest.mark.parametrize("strength", [0.3, 0.7, 1.0])
def test_img2img_partial_schedule_matches_diffusers(scheduler_kind, strength):
    """diffusers' img2img recipe: get_timesteps cut + set_begin_index + add_noise/scale_noise."""
    steps, shift = 20, 3.0
    toy, noise = ToyModel(), _noise()
    clean = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    if scheduler_kind == "dpm":
        scheduler, schedule, solver = _dpm_scheduler(shift), flow_dpm_schedule(steps, shift), flow_dpm_solver
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        schedule, solver = flow_euler_schedule(steps, shift), flow_euler
    scheduler.set_timesteps(steps)
    start = int(max(steps - min(steps * strength, steps), 0))  # diffusers' get_timesteps
    timesteps = scheduler.timesteps[start:]
    scheduler.set_begin_index(start)
    first = timesteps[:1].repeat(BATCH)
    if scheduler_kind == "dpm":
        start_latents = scheduler.add_noise(clean, noise, first)
    else:
        start_latents = scheduler.scale_noise(clean, first, noise)
    expected = _diffusers_loop(scheduler, toy, start_latents, 4.5, timesteps=timesteps)

    cut = schedule.for_strength(strength)
    assert cut.num_steps == len(timesteps) and torch.equal(cut.timesteps, timesteps)
    ours_start = add_flow_noise(clean, noise, cut.sigmas[0])
    assert torch.equal(ours_start, start_latents)
    ours = _ours(solver, cut, toy, ours_start, 4.5)
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


def test_img2img_strength_that_leaves_no_step_is_rejected():
    with pytest.raises(SanaInputError, match="strength 0.0 "):
        flow_dpm_schedule(20, 3.0).for_strength(0.0)


class _PAGGuidance(PAGMixin):
    """Just enough state for diffusers' own PAG combination (`_apply_perturbed_attention_guidance`)."""

    def __init__(self, pag_scale: float, pag_adaptive_scale: float):
        self._pag_scale, self._pag_adaptive_scale = pag_scale, pag_adaptive_scale
        self.pag_applied_layers = ["transformer_blocks.0"]


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
@pytest.mark.parametrize("pag_adaptive_scale", [0.0, 0.004])
def test_pag_matches_diffusers_combination_over_a_solve(guidance_scale, pag_adaptive_scale):
    steps, pag_scale = 12, 3.0
    toy, noise = ToyModel(), _noise()
    pag = _PAGGuidance(pag_scale, pag_adaptive_scale)
    cfg = guidance_scale > 1.0
    branches = ("uncond", "cond", "perturbed") if cfg else ("cond", "perturbed")
    assert guidance_branches(guidance_scale, pag_scale) == branches
    context = toy.context(branches, BATCH)
    scheduler = _dpm_scheduler(3.0)
    scheduler.set_timesteps(steps)
    latents = noise.clone()
    for t in scheduler.timesteps:  # SanaPAGPipeline's loop
        model_input = torch.cat([latents] * len(branches))
        v = toy(model_input, t.expand(model_input.shape[0]).to(latents.dtype), context).float()
        v = pag._apply_perturbed_attention_guidance(v, cfg, guidance_scale, t)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]

    velocity = guided_velocity(
        lambda x, t: toy(x, t, context),
        guidance_scale=guidance_scale,
        pag_scale=pag_scale,
        pag_adaptive_scale=pag_adaptive_scale,
    )
    ours = flow_dpm_solver(velocity, noise.clone(), flow_dpm_schedule(steps, 3.0))
    torch.testing.assert_close(ours, latents, rtol=0, atol=ATOL)


def test_combine_guidance_terms_are_independent():
    g = torch.Generator().manual_seed(3)
    u, c, p = (torch.randn(2, 3, generator=g) for _ in range(3))
    torch.testing.assert_close(combine_guidance(c), c)
    torch.testing.assert_close(combine_guidance(c, v_uncond=u, guidance_scale=1.0), c)
    torch.testing.assert_close(combine_guidance(c, v_uncond=u, guidance_scale=0.0), u)
    torch.testing.assert_close(combine_guidance(c, v_perturbed=p, pag_scale=2.0), 3 * c - 2 * p)


@pytest.mark.parametrize("generator_list", [False, True])
def test_draw_noise_matches_diffusers_randn_tensor(generator_list):
    shape = (3, 4, 6, 5)

    def generator():
        if generator_list:
            return [torch.Generator().manual_seed(i) for i in range(shape[0])]
        return torch.Generator().manual_seed(7)

    assert torch.equal(draw_noise(shape, generator()), randn_tensor(shape, generator=generator(), dtype=torch.float32))


class ToyTrigflowModel:
    """Sprint-style velocity: depends on x, the flow time t (in [0, 1]) and a guidance value."""

    def __init__(self, guidance: float):
        g = torch.Generator().manual_seed(11)
        self.mix = torch.randn(CHANNELS, CHANNELS, generator=g) * 0.3
        self.bias = torch.randn(CHANNELS, 1, 1, generator=g)
        self.guidance = guidance

    def __call__(self, x, t):
        t = t.float().view(-1, 1, 1, 1)
        return torch.einsum("oc,bchw->bohw", self.mix, x) * (1 - t) + torch.sin(2 * t) * self.bias * self.guidance


@pytest.mark.parametrize(
    ("steps", "intermediate"), [(1, None), (2, 1.3), (2, None), (4, None), (7, None)]
)
def test_trigflow_matches_diffusers_scm_scheduler(steps, intermediate):
    """SanaSprintPipeline's loop with SCMScheduler.step, noise from the same seeded generator."""
    model = ToyTrigflowModel(guidance=0.45)
    shape, sigma_data = (BATCH, CHANNELS, SIDE, SIDE), 0.5

    scheduler = SCMScheduler()
    scheduler.set_timesteps(steps, max_timesteps=1.57080, intermediate_timesteps=intermediate)
    scheduler.set_begin_index(0)
    generator = torch.Generator().manual_seed(42)
    latents = randn_tensor(shape, generator=generator, dtype=torch.float32) * sigma_data
    for s in scheduler.timesteps[:-1]:
        angle = s.expand(BATCH)
        t = torch.sin(angle) / (torch.cos(angle) + torch.sin(angle))
        t4 = t.view(-1, 1, 1, 1)
        x_model = latents / sigma_data * torch.sqrt(t4**2 + (1 - t4) ** 2)
        v = model(x_model, t)
        prediction = ((1 - 2 * t4) * x_model + (1 - 2 * t4 + 2 * t4**2) * v) / torch.sqrt(t4**2 + (1 - t4) ** 2)
        latents, denoised = scheduler.step(prediction.float() * sigma_data, angle, latents, generator=generator, return_dict=False)
    expected = denoised / sigma_data

    generator = torch.Generator().manual_seed(42)
    angles = trigflow_schedule(steps, intermediate_timestep=intermediate)
    assert torch.equal(angles, scheduler.timesteps)
    start = trigflow_start_latents(draw_noise(shape, generator))
    ours = trigflow_sampler(model, start, angles, generator=generator)
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------
# The real diffusers pipelines on a tiny random transformer


def _tiny_transformer(**overrides) -> SanaTransformer2DModel:
    torch.manual_seed(0)
    config = dict(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
    )
    config.update(overrides)
    return SanaTransformer2DModel(**config).eval()


def _text_inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, 6, 8, generator=g)
    mask = torch.ones(batch, 6, dtype=torch.int64)
    mask[:, 4:] = 0
    return embeds, mask


def _dit_model(transformer, context, mask, guidance=None):
    def model(x, t):
        with torch.no_grad():
            return transformer(
                x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t, guidance=guidance, return_dict=False
            )[0]

    return model


# A 128x128 request with no VAE (scale factor 32) gives 4x4 latents.
PIPE_SIDE = 128


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_sana_pipeline_latents_match(guidance_scale):
    transformer = _tiny_transformer()
    scheduler = _dpm_scheduler(3.0)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pos, pos_mask = _text_inputs(1, 1)
    neg, neg_mask = _text_inputs(1, 2)
    expected = pipe(
        prompt_embeds=pos,
        prompt_attention_mask=pos_mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        negative_prompt=None,
        guidance_scale=guidance_scale,
        num_inference_steps=6,
        height=PIPE_SIDE,
        width=PIPE_SIDE,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        use_resolution_binning=False,
    ).images

    branches = guidance_branches(guidance_scale)
    texts = {"uncond": (neg, neg_mask), "cond": (pos, pos_mask)}
    context = torch.cat([texts[b][0] for b in branches])
    mask = torch.cat([texts[b][1] for b in branches])
    noise = draw_noise((1, 4, PIPE_SIDE // 32, PIPE_SIDE // 32), torch.Generator().manual_seed(0))
    velocity = guided_velocity(_dit_model(transformer, context, mask), guidance_scale=guidance_scale)
    ours = flow_dpm_solver(velocity, noise, flow_dpm_schedule(6, 3.0))
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


def test_sana_pag_pipeline_latents_match():
    """Only the PAG-off path can use the real pipeline without the DiT's identity attention;
    pag_scale=0 must equal plain CFG, and the combination itself is pinned above."""
    transformer = _tiny_transformer()
    pipe = SanaPAGPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=_dpm_scheduler(3.0)
    )
    pipe.set_progress_bar_config(disable=True)
    pos, pos_mask = _text_inputs(1, 1)
    neg, neg_mask = _text_inputs(1, 2)
    expected = pipe(
        prompt_embeds=pos,
        prompt_attention_mask=pos_mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        negative_prompt=None,
        guidance_scale=4.5,
        pag_scale=0.0,
        num_inference_steps=5,
        # diffusers' PAG pipeline falls back to a VAE factor of 8 (not 32) without a VAE.
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        use_resolution_binning=False,
    ).images
    assert guidance_branches(4.5, 0.0) == ("uncond", "cond")
    noise = draw_noise((1, 4, 4, 4), torch.Generator().manual_seed(0))
    model = _dit_model(transformer, torch.cat([neg, pos]), torch.cat([neg_mask, pos_mask]))
    ours = flow_dpm_solver(guided_velocity(model, guidance_scale=4.5, pag_scale=0.0), noise, flow_dpm_schedule(5, 3.0))
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


def _sprint_transformer():
    return _tiny_transformer(qk_norm="rms_norm_across_heads", guidance_embeds=True)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sana_sprint_pipeline_latents_match(steps):
    transformer = _sprint_transformer()
    pipe = SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=SCMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pos, pos_mask = _text_inputs(2, 1)
    intermediate = 1.3 if steps == 2 else None
    expected = pipe(
        prompt_embeds=pos,
        prompt_attention_mask=pos_mask,
        guidance_scale=4.5,
        num_inference_steps=steps,
        intermediate_timesteps=intermediate,
        height=PIPE_SIDE,
        width=PIPE_SIDE,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        use_resolution_binning=False,
    ).images

    generator = torch.Generator().manual_seed(3)
    guidance = torch.full((2,), 4.5).to(pos.dtype) * transformer.config.guidance_embeds_scale
    start = trigflow_start_latents(draw_noise((2, 4, 4, 4), generator))
    ours = trigflow_sampler(_dit_model(transformer, pos, pos_mask, guidance), start, trigflow_schedule(steps), generator=generator)
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


class _PoolingVAE(torch.nn.Module):
    """Stands in for DC-AE in the Sprint img2img pipeline: `encode` average-pools the pixels by
    32 into 4 channels and remembers its output, so the test can start from the same latents."""

    def __init__(self):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.register_buffer("anchor", torch.zeros(()))
        self.config = FrozenDict(encoder_block_out_channels=[8] * 6, scaling_factor=0.41407)
        self.last_latents: torch.Tensor | None = None

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def encode(self, image):
        pooled = torch.nn.functional.avg_pool2d(image, 32)
        self.last_latents = torch.cat([pooled, pooled.mean(1, keepdim=True) * 2], dim=1)
        return type("Encoded", (), {"latent": self.last_latents})()


def test_sana_sprint_img2img_pipeline_latents_match():
    steps, strength = 4, 0.5
    transformer = _sprint_transformer()
    vae = _PoolingVAE()
    pipe = SanaSprintImg2ImgPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=SCMScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    pos, pos_mask = _text_inputs(1, 1)
    image = torch.rand(1, 3, PIPE_SIDE, PIPE_SIDE, generator=torch.Generator().manual_seed(9))
    expected = pipe(
        image=image,
        strength=strength,
        prompt_embeds=pos,
        prompt_attention_mask=pos_mask,
        guidance_scale=4.5,
        num_inference_steps=steps,
        intermediate_timesteps=None,
        height=PIPE_SIDE,
        width=PIPE_SIDE,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        use_resolution_binning=False,
    ).images
    assert vae.last_latents is not None and vae.last_latents.shape == (1, 4, 4, 4)

    generator = torch.Generator().manual_seed(3)
    angles = trigflow_schedule(steps)[img2img_start_step(steps, strength) :]
    assert len(angles) == 3  # 4 steps at strength 0.5 run 2
    start = trigflow_start_latents(
        draw_noise((1, 4, 4, 4), generator),
        image_latents=vae.last_latents * vae.config.scaling_factor,
        first_angle=angles[0],
    )
    guidance = torch.full((1,), 4.5).to(pos.dtype) * transformer.config.guidance_embeds_scale
    ours = trigflow_sampler(_dit_model(transformer, pos, pos_mask, guidance), start, angles, generator=generator)
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)
