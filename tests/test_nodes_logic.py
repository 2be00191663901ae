"""What the Sana nodes compute, on tiny random checkpoints the tests write (no ComfyUI needed).

The sampler functions are driven the way ComfyUI drives a KSAMPLER: `model(x, sigma, **extra_args)`
returns the (CFG-combined) denoised x0, with x0 = x - sigma v as ComfyUI's flow (CONST) model
computes it, and the start is ComfyUI's noise scaling of an empty latent, sigma0 * noise.
With that start, the result equals `sana.generate(latents=sigma0 * noise)` (Flow-DPM-Solver,
Flow-Euler) and `sana.generate(seed=seed)` (Sprint, whose per-step noise follows the seed).
"""

from __future__ import annotations

import math

import pytest
import torch

from node_fixtures import GEMMA_HIDDEN, ext_module, random_dcae, random_dit, tiny_dit_config
from tiny_gemma import build_tiny_gemma

torch.set_num_threads(2)
lib = ext_module("sana")
latents_node = ext_module("nodes.latents")
loaders = ext_module("nodes.loaders")
node_lora = ext_module("nodes.lora")
node_sampling = ext_module("nodes.sampling")
node_text = ext_module("nodes.text")
node_vae = ext_module("nodes.vae")
previews = ext_module("nodes.previews")
sampling_layer = ext_module("sana.sampling")
pipeline = ext_module("sana.pipeline")
samplers = ext_module("sana.samplers")
schedules = ext_module("sana.schedules")
dcae_module = ext_module("sana.dcae")
dcae_io = ext_module("sana.dcae_io")

ATOL = 1e-4
HEIGHT, WIDTH = 128, 96  # 4 x 3 latents


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("node_parts")
    gemma = build_tiny_gemma(root / "gemma", hidden_size=GEMMA_HIDDEN)
    text_encoder = lib.load_text_encoder(gemma, attn_implementation="eager")
    dit_path, sprint_path, dcae_path = root / "dit.safetensors", root / "sprint.safetensors", root / "dcae.safetensors"
    lib.save_dit(random_dit(lib, tiny_dit_config(lib)), dit_path)
    lib.save_dit(random_dit(lib, tiny_dit_config(lib, sprint=True), seed=1), sprint_path)
    dcae_io.save_dcae(random_dcae(dcae_module), dcae_path)
    return {
        "text_encoder": text_encoder,
        "dit": lib.load_dit(dit_path),
        "sprint": lib.load_dit(sprint_path),
        "dcae": dcae_io.load_dcae(dcae_path),
    }


def comfy_flow_model(dit, positive, negative, cfg, *, guidance=None):
    """A stand-in for ComfyUI's CFG guider over a flow model: denoised = x - sigma * v_guided, the
    DiT timestep being sigma * 1000 unless the sampler put one in transformer_options."""
    (cond, cond_extra), = positive
    (uncond, uncond_extra), = negative
    calls = []

    @torch.no_grad()  # ComfyUI samples under inference mode
    def model(x, sigma, model_options=None, seed=None):
        options = (model_options or {}).get("transformer_options", {})
        timestep = options.get(node_sampling.DIT_TIMESTEP_KEY)
        t = torch.full((x.shape[0],), float(timestep)) if timestep is not None else sigma * (1.0 if guidance is not None else 1000.0)
        calls.append(t[0].item())
        v_cond = dit(x, t, cond, cond_extra["attention_mask"], None if guidance is None else torch.tensor([guidance]))
        v_uncond = None
        if cfg > 1:
            v_uncond = dit(x, t, uncond, uncond_extra["attention_mask"])
        v = samplers.combine_guidance(v_cond, v_uncond=v_uncond, guidance_scale=cfg)
        return x - sigma.view(-1, 1, 1, 1) * v

    return model, calls


def reference(parts, **kwargs):
    return pipeline.generate(dit=parts["dit"], dcae=parts["dcae"], text_encoder=parts["text_encoder"], prompt="a red bicycle",
                             height=HEIGHT, width=WIDTH, resolution_binning=False, **kwargs)


def conditionings(parts):
    te = parts["text_encoder"]
    positive = node_text.encode_conditioning(te, "a red bicycle", chi=node_text.chi_argument("preset"), max_tokens=300)
    negative = node_text.encode_conditioning(te, "", chi=False, max_tokens=300)
    return positive, negative


@pytest.mark.parametrize("solver", ["flow_dpm_solver", "flow_euler"])
def test_flow_sampler_matches_sana_generate(parts, solver):
    seed, steps, cfg = 7, 6, 4.5
    positive, negative = conditionings(parts)
    schedule = sampling_layer.sampling_schedule(solver, steps, 3.0)
    table = schedule.timesteps if solver == "flow_dpm_solver" else None
    noise = samplers.draw_noise((1, 32, HEIGHT // 32, WIDTH // 32), torch.Generator().manual_seed(seed))
    start = schedule.sigmas[0] * noise  # ComfyUI: sigma0 * noise + (1 - sigma0) * empty latent
    model, calls = comfy_flow_model(parts["dit"], positive, negative, cfg)
    steps_seen = []
    latents = node_sampling.sampler_function(solver, table)(model, start, schedule.sigmas, {"model_options": {}, "seed": seed},
                                                   lambda d: steps_seen.append(d["i"]), False)
    ours = pipeline.latents_to_images(parts["dcae"], latents, HEIGHT, WIDTH)
    expected = reference(parts, steps=steps, guidance_scale=cfg, solver=solver, latents=start, seed=seed)
    assert steps_seen == list(range(steps))
    if solver == "flow_dpm_solver":
        assert calls == [float(t) for t in schedule.timesteps]  # diffusers' integer timesteps
        assert all(c == math.floor(c) for c in calls)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert ours.std() > 0.01  # a real image, not a constant


def test_dpm_timesteps_without_a_table_are_diffusers_integers():
    for steps, shift in ((20, 3.0), (7, 6.0), (50, 4.5)):
        schedule = schedules.flow_dpm_schedule(steps, shift)
        assert [node_sampling.dpm_dit_timestep(s) for s in schedule.sigmas[:-1].tolist()] == schedule.timesteps.tolist()


def test_flow_img2img_schedule_matches_generate(parts):
    seed, steps, denoise = 3, 10, 0.6
    positive, negative = conditionings(parts)
    image = torch.rand(1, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(0))
    clean = pipeline.images_to_latents(parts["dcae"], image, HEIGHT, WIDTH)
    schedule = sampling_layer.sampling_schedule("flow_dpm_solver", steps, 3.0, denoise)
    assert schedule.num_steps == 6  # diffusers: keep int(10 * 0.6) steps
    noise = samplers.draw_noise(clean.shape, torch.Generator().manual_seed(seed))
    start = schedule.sigmas[0] * noise + (1 - schedule.sigmas[0]) * clean  # ComfyUI's noise scaling
    model, _ = comfy_flow_model(parts["dit"], positive, negative, 4.5)
    latents = node_sampling.sampler_function("flow_dpm_solver", schedule.timesteps)(model, start, schedule.sigmas, {"model_options": {}}, None, False)
    ours = pipeline.latents_to_images(parts["dcae"], latents, HEIGHT, WIDTH)
    expected = reference(parts, steps=steps, guidance_scale=4.5, image=image, strength=denoise, seed=seed)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [2, 3])
def test_sprint_sampler_matches_sana_generate(parts, steps):
    seed, guidance = 11, 4.5
    positive, negative = conditionings(parts)
    schedule = sampling_layer.sampling_schedule("trigflow", steps, 3.0)
    assert schedule.sigmas[-1] == 0 and schedule.sigmas[0] > 0.99
    noise = samplers.draw_noise((1, 32, HEIGHT // 32, WIDTH // 32), torch.Generator().manual_seed(seed))
    start = schedule.sigmas[0] * noise
    model, calls = comfy_flow_model(parts["sprint"], positive, negative, 1.0, guidance=guidance)
    latents = node_sampling.sampler_function("trigflow")(model, start, schedule.sigmas, {"model_options": {}, "seed": seed}, None, False)
    ours = pipeline.latents_to_images(parts["dcae"], latents, HEIGHT, WIDTH)
    expected = pipeline.generate(dit=parts["sprint"], dcae=parts["dcae"], text_encoder=parts["text_encoder"], prompt="a red bicycle",
                          height=HEIGHT, width=WIDTH, resolution_binning=False, steps=steps, guidance_scale=guidance, seed=seed)
    assert len(calls) == steps and all(0 < c <= 1.0001 for c in calls)  # the DiT sees flow times
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_conditioning_carries_its_own_mask(parts):
    positive, negative = conditionings(parts)
    (embeds, extra), = positive
    (neg_embeds, neg_extra), = negative
    assert embeds.shape == (1, 300, GEMMA_HIDDEN) and extra["attention_mask"].shape == (1, 300)
    assert neg_embeds.shape == (1, 300, GEMMA_HIDDEN)
    # "" is BOS only; the prompt is several tokens: different masks that stay with their prompts.
    assert int(neg_extra["attention_mask"].sum()) == 1 < int(extra["attention_mask"].sum())
    embeds_chi_off, _ = parts["text_encoder"].encode(["a red bicycle"], chi=False)
    assert not torch.equal(embeds_chi_off.cpu(), embeds)  # the CHI changes the prompt states
    assert node_text.chi_argument("custom", "  ") is False and node_text.chi_argument("custom", "Be vivid: ") == "Be vivid: "
    with pytest.raises(lib.SanaInputError):
        node_text.chi_argument("maybe")


def test_empty_latent_bins_keep_orientation():
    latent, width, height = latents_node.empty_latent(768, 1344, 2, "1024px")  # portrait request
    assert (width, height) == (768, 1344) and latent.shape == (2, 32, 42, 24)
    assert latents_node.snap_to_bins(1344, 768, "1024px") == (1344, 768)  # landscape stays landscape
    assert latents_node.snap_to_bins(1000, 1000, "4096px") == (4096, 4096)
    assert latents_node.snap_to_bins(700, 500, "512px")[0] > latents_node.snap_to_bins(700, 500, "512px")[1]
    assert latents_node.snap_to_bins(1000, 1000, "2048px") == (2048, 2048)
    assert latents_node.empty_latent(96, 64, 1, "off")[0].shape == (1, 32, 2, 3)
    with pytest.raises(lib.SanaInputError):
        latents_node.empty_latent(100, 64, 1, "off")


def test_preview_factors_fit_beats_a_constant(parts):
    dcae = parts["dcae"]
    factors, bias = previews.fit_latent_rgb_factors(dcae)
    assert len(factors) == 32 and all(len(row) == 3 for row in factors) and len(bias) == 3
    # Held-out solid colours: the fitted preview must beat predicting mid-grey (0 in [-1, 1]).
    colours = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.7, 0.3], [0.2, 0.3, 0.9], [0.7, 0.7, 0.2], [0.3, 0.3, 0.3]])
    images = colours[:, :, None, None].expand(-1, -1, 64, 64)
    with torch.no_grad():
        latents = dcae.encode(images * 2 - 1) * dcae.scaling_factor
    predicted = previews.preview_rgb(latents, factors, bias).mean(dim=(1, 2))
    target = colours * 2 - 1
    fit_error = (predicted - target).abs().mean()
    assert fit_error < 0.5 * target.abs().mean(), (fit_error, target.abs().mean())
    previews.register_preview_factors(32, factors, bias)
    assert previews.preview_factors(32) == (factors, bias)


def test_preview_fallback_is_neutral_grey():
    factors, bias = previews.preview_factors(7)  # nothing registered for 7 channels
    assert all(row[0] == row[1] == row[2] > 0 for row in factors) and bias == [0.0, 0.0, 0.0]


def test_decode_reports_each_tile_and_matches_the_dcae(parts):
    dcae = parts["dcae"]
    latents = torch.randn(1, 32, 6, 5, generator=torch.Generator().manual_seed(0))
    steps = []
    tiled = node_vae.decode_latents(dcae, latents, tile_size=128, tile_overlap=32, on_step=lambda d, t: steps.append((d, t)))
    rows, cols = len(ext_module("sana.dcae_tiling").tile_spans(6, 4, 1)), len(ext_module("sana.dcae_tiling").tile_spans(5, 4, 1))
    assert steps[-1] == (rows * cols, rows * cols) and len(steps) == rows * cols + 1
    with torch.no_grad():
        expected = dcae.decode(latents, tile_size=128, tile_overlap=32)
    torch.testing.assert_close(tiled, (expected / 2 + 0.5).clamp(0, 1).movedim(1, -1))
    whole = node_vae.decode_latents(dcae, latents)
    assert whole.shape == (1, 192, 160, 3) and 0 <= whole.min() and whole.max() <= 1


def test_encode_crops_to_the_compression(parts):
    dcae = parts["dcae"]
    images = torch.rand(2, 70, 100, 3)
    latents = node_vae.encode_images(dcae, images)
    assert latents.shape == (2, 32, 2, 3)
    with torch.no_grad():
        expected = dcae.encode(images[:, 3:67, 2:98].movedim(-1, 1) * 2 - 1)
    torch.testing.assert_close(latents, expected)


def test_model_listing_and_resolution(tmp_path):
    root = tmp_path / "diffusion_models"
    (root / "sub").mkdir(parents=True)
    (root / "Sana_1600M_1024px_BF16.pth").write_bytes(b"x")
    (root / "sub" / "model.safetensors").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    pipeline_root = root / "Sana_1600M_1024px_BF16_diffusers"
    (pipeline_root / "transformer").mkdir(parents=True)
    (pipeline_root / "transformer" / "config.json").write_text("{}")
    (pipeline_root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    names = loaders.list_model_entries([root], {".pth", ".safetensors"}, lambda p: loaders.has_config(p, "transformer"))
    assert names == ["Sana_1600M_1024px_BF16.pth", "Sana_1600M_1024px_BF16_diffusers", "sub/model.safetensors"]
    assert loaders.resolve_model_entry([tmp_path / "missing", root], "sub/model.safetensors") == root / "sub" / "model.safetensors"
    with pytest.raises(lib.SanaCheckpointError, match="not found"):
        loaders.resolve_model_entry([root], "nope.pth")
    with pytest.raises(lib.SanaInputError):
        loaders.resolve_model_entry([root], "../escape.pth")
    gemma = tmp_path / "text_encoders" / "gemma-2-2b-it"
    gemma.mkdir(parents=True)
    (gemma / "config.json").write_text('{"model_type": "gemma2"}')
    (tmp_path / "text_encoders" / "t5").mkdir()
    (tmp_path / "text_encoders" / "t5" / "config.json").write_text('{"model_type": "t5"}')
    assert loaders.list_model_entries([tmp_path / "text_encoders"], (), loaders.is_gemma_folder, include_files=False) == ["gemma-2-2b-it"]


# ---------------------------------------------------------------------------------------------
# LoRA key map (the Sana LoRA Loader hands it to ComfyUI's own LoRA patching)


def test_lora_key_map_and_alphas_apply_the_same_update_as_sana_load_lora(tmp_path):
    lora = ext_module("sana.lora")
    checkpoint = ext_module("sana.checkpoint")
    dit = random_dit(lib, tiny_dit_config(lib))
    C = dit.config.hidden_size
    key_map = node_lora.lora_patch_keys(dit, "diffusion_model.dit.")
    assert key_map["transformer.transformer_blocks.1.attn1.to_k"] == ("diffusion_model.dit.blocks.1.attn.qkv.weight", (0, C, C))
    assert key_map["transformer_blocks.0.attn2.to_v"] == ("diffusion_model.dit.blocks.0.cross_attn.kv_linear.weight", (0, C, C))
    assert key_map["transformer.transformer_blocks.0.ff.conv_inverted"] == "diffusion_model.dit.blocks.0.mlp.inverted_conv.weight"
    assert set(k for k in key_map if not k.startswith("transformer.")) == set(lora.lora_targets(dit))

    # A PEFT-style file whose metadata says lora_alpha = 2r (so the update is 2·B·A, not B·A).
    rank, g = 2, torch.Generator().manual_seed(3)
    modules = ["transformer_blocks.0.attn1.to_k", "transformer_blocks.1.attn2.to_v", "transformer_blocks.0.ff.conv_point"]
    state = {}
    for module in modules:
        target = lora.lora_targets(dit)[module]
        out = target.rows[1] - target.rows[0]
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, target.in_features, generator=g)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    metadata = {lora.METADATA_KEY: '{"transformer.lora_alpha": 4, "transformer.r": 2}'}
    path = tmp_path / "lora.safetensors"
    checkpoint.write_safetensors(path, state, metadata)
    alphas = node_lora.lora_alpha_entries(state, checkpoint.open_checkpoint(path).metadata)
    assert {k: float(v) for k, v in alphas.items()} == {f"transformer.{m}.alpha": 4.0 for m in modules}
    assert node_lora.lora_alpha_entries(state, {}) == {k: torch.tensor(2.0) for k in alphas}  # no metadata: alpha = rank

    # ComfyUI's LoRA patch on a (weight, (dim, start, length)) key: W[start:start+length] += s·alpha/r·B·A.
    strength = 0.7
    expected = lora.load_lora(random_dit(lib, tiny_dit_config(lib)), path, strength).state_dict()
    patched = {k: v.clone() for k, v in dit.state_dict().items()}
    for module in modules:
        key = key_map[f"transformer.{module}"]
        weight, (dim, start, length) = (key, (0, 0, None)) if isinstance(key, str) else key
        name = weight[len("diffusion_model.dit."):]
        a, b = state[f"transformer.{module}.lora_A.weight"], state[f"transformer.{module}.lora_B.weight"]
        rows = patched[name].narrow(dim, start, length if length is not None else patched[name].shape[0])
        rows += strength * float(alphas[f"transformer.{module}.alpha"]) / rank * (b @ a).reshape(rows.shape)
    for name, tensor in expected.items():
        torch.testing.assert_close(patched[name], tensor, rtol=1e-5, atol=1e-6)
