"""SANA ControlNet: parity with diffusers' SanaControlNetModel (and the DiT taking its residuals as
SanaTransformer2DModel takes `controlnet_block_samples`), the files it comes in, and training."""

from __future__ import annotations

import pytest
import torch
from diffusers import SanaControlNetModel
from safetensors.torch import save_file

import sana
from controlnet_checkpoints import (
    WIDTHS,
    inputs,
    official_controlnet_state_dict,
    random_base,
    random_controlnet,
    write_official_release,
)
from dit_checkpoints import official_state_dict, write_official_pth
from sana.controlnet import CONTROLNET_PRESETS, SanaControlNet
from sana.controlnet_io import controlnet_state_dict, save_controlnet
from sana.dit_io import config_from_diffusers
from sana.errors import SanaCheckpointError, SanaInputError, SanaNonFiniteError


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def reference_residuals(ref: SanaControlNetModel, x, timestep, context, control, mask, scale=1.0):
    with torch.no_grad():
        return ref(x, context, timestep, control, conditioning_scale=scale, encoder_attention_mask=mask, return_dict=False)[0]


def write_checkpoint(ref: SanaControlNetModel, fmt: str, tmp_path):
    """Write `ref` in `fmt`; returns (path, config to pass or None)."""
    if fmt == "official-release":  # the whole SanaMSControlNet, base DiT included
        return write_official_release(ref, random_base(ref), tmp_path / "controlnet.pth"), config_for(ref)
    if fmt == "diffusers-folder":
        ref.save_pretrained(tmp_path / "controlnet")
        return tmp_path / "controlnet", None
    if fmt == "pipeline-root":
        ref.save_pretrained(tmp_path / "pipe" / "controlnet")
        return tmp_path / "pipe", None
    if fmt == "diffusers-file":
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "controlnet.safetensors"))
        return tmp_path / "controlnet.safetensors", config_for(ref)
    raise AssertionError(fmt)


def config_for(ref: SanaControlNetModel) -> sana.SanaDiTConfig:
    # Tiny widths are no release: bare files need the head counts from the caller.
    return config_from_diffusers(dict(ref.config))


FORMATS = ["official-release", "diffusers-folder", "pipeline-root", "diffusers-file"]


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_parity_with_diffusers(width, fmt, tmp_path):
    """Every residual within fp32 rel 1e-5 of diffusers', and the DiT fed them within 1e-5 of
    diffusers' transformer fed `controlnet_block_samples`."""
    ref = random_controlnet(width)
    base = random_base(ref)
    path, config = write_checkpoint(ref, fmt, tmp_path)
    ours = sana.load_controlnet(path, config=config)
    assert ours.config.depth == ref.config.num_layers and ours.config.hidden_size == ref.config.cross_attention_dim

    x, timestep, context, control, mask = inputs(ref)
    expected = reference_residuals(ref, x, timestep, context, control, mask, scale=0.7)
    with torch.no_grad():
        got = ours(x, timestep, context, control, mask, scale=0.7)
    assert got[0] is None and len(got) == len(expected) + 1
    for sample, residual in zip(expected, got[1:]):
        assert residual.shape == sample.shape
        assert rel_err(residual, sample) <= 1e-5

    base.save_pretrained(tmp_path / "base")
    dit = sana.load_dit(tmp_path / "base")
    with torch.no_grad():
        reference = base(x, context, timestep, encoder_attention_mask=mask, controlnet_block_samples=tuple(expected)).sample
        plain = base(x, context, timestep, encoder_attention_mask=mask).sample
        controlled = dit(x, timestep, context, mask, block_residuals=got)
    assert rel_err(controlled, reference) <= 1e-5
    assert rel_err(reference, plain) > 1e-2  # the residuals matter: the comparison proves something


def test_positional_embedding_reaches_the_control_too(tmp_path):
    """2K/4K-style models (sincos PE): diffusers adds the table to the control's patches as well."""
    ref = random_controlnet("600m", interpolation_scale=1.0)
    ref.save_pretrained(tmp_path)
    ours = sana.load_controlnet(tmp_path)
    assert ours.config.interpolation_scale == 1.0
    x, timestep, context, control, mask = inputs(ref)
    expected = reference_residuals(ref, x, timestep, context, control, mask)
    with torch.no_grad():
        got = ours(x, timestep, context, control, mask)
    assert max(rel_err(a, b) for a, b in zip(got[1:], expected)) <= 1e-5


def test_one_control_image_serves_the_batch(tmp_path):
    ref = random_controlnet("600m")
    ref.save_pretrained(tmp_path)
    ours = sana.load_controlnet(tmp_path)
    x, timestep, context, control, mask = inputs(ref)
    with torch.no_grad():
        one = ours(x, timestep, context, control[:1], mask)
        two = ours(x, timestep, context, control[:1].expand(2, -1, -1, -1), mask)
    for a, b in zip(one[1:], two[1:]):  # the patch embedding's GEMM of 1 or 2 rows rounds differently
        assert rel_err(a, b) <= 1e-5
    with pytest.raises(SanaInputError, match="control latents have shape"):
        ours(x, timestep, context, control[:, :, :4], mask)


# ------------------------------------------------------------------------------------------
# The DiT's residual input
# ------------------------------------------------------------------------------------------


def tiny_dit(depth: int = 3, seed: int = 0) -> sana.SanaDiT:
    config = sana.SanaDiTConfig(hidden_size=36, depth=depth, attention_head_dim=4, cross_attention_heads=4,
                                cross_attention_head_dim=9, caption_channels=10, in_channels=4, out_channels=4, sample_size=8)
    torch.manual_seed(seed)
    dit = sana.SanaDiT(config).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit


def dit_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    x, control = torch.randn(batch, 4, 6, 10, generator=g), torch.randn(1, 4, 6, 10, generator=g)
    context, mask = torch.randn(batch, 7, 10, generator=g), torch.ones(batch, 7)
    mask[-1, 4:] = 0
    return x, torch.tensor([999, 312][:batch]), context, control, mask


def test_residuals_go_after_their_block():
    """Entry i is added after block i: the same residual after block 1 or after block 2 changes
    the output differently; None entries and a None list leave the DiT exactly as it is."""
    dit = tiny_dit()
    x, timestep, context, _, mask = dit_inputs()
    residual = 0.5 * torch.randn(2, 60, 36, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = dit(x, timestep, context, mask)
        assert torch.equal(dit(x, timestep, context, mask, block_residuals=[None, None]), plain)
        after_1 = dit(x, timestep, context, mask, block_residuals=[None, residual])
        after_2 = dit(x, timestep, context, mask, block_residuals=[None, None, residual])
    assert (after_1 - plain).abs().max() > 1e-3 and (after_2 - plain).abs().max() > 1e-3
    assert (after_1 - after_2).abs().max() > 1e-3
    with pytest.raises(SanaInputError, match=r"block_residuals has 4 entries, but the DiT has 3 blocks"):
        dit(x, timestep, context, mask, block_residuals=[None, None, None, residual])
    with pytest.raises(SanaInputError, match=r"block_residuals\[1\] has shape \[2, 60, 35\]"):
        dit(x, timestep, context, mask, block_residuals=[None, residual[..., :35]])


def test_dit_and_controlnet_trace_as_one_graph():
    """torch.compile(fullgraph=True) of a ControlNet call and of the DiT fed its residuals."""
    import torch._dynamo

    dit = tiny_dit()
    controlnet = SanaControlNet.from_dit(dit, 2)
    with torch.no_grad():
        for projection in (controlnet.input_proj, *controlnet.output_projs):
            projection.weight.normal_(0, 0.1)
    x, timestep, context, control, mask = dit_inputs()

    def step(x, t):
        residuals = controlnet(x, t, context, control, mask, scale=0.8, trim_context=False)
        return dit(x, t, context, mask, trim_context=False, block_residuals=residuals)

    torch._dynamo.reset()
    traced = torch.compile(step, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(traced(x, timestep), step(x, timestep), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Training: built from a DiT, a no-op until trained; gradients reach what they must
# ------------------------------------------------------------------------------------------


def test_from_dit_copies_the_blocks_and_starts_as_a_no_op():
    dit = tiny_dit()
    controlnet = SanaControlNet.from_dit(dit, 2)
    assert controlnet.config.depth == 2 and not controlnet.training
    for name, tensor in controlnet.state_dict().items():
        if name.startswith(("input_proj.", "output_projs.")):
            assert not tensor.any(), name
        else:
            assert torch.equal(tensor, dit.state_dict()[name]), name
    x, timestep, context, control, mask = dit_inputs()
    with torch.no_grad():
        residuals = controlnet(x, timestep, context, control, mask)
        assert torch.equal(dit(x, timestep, context, mask, block_residuals=residuals), dit(x, timestep, context, mask))
    for blocks in (0, 3, 2.0):
        with pytest.raises(SanaInputError, match=r"blocks must be an integer in \[1, 2\]"):
            SanaControlNet.from_dit(dit, blocks)


def controlnet_gradients(controlnet, dit, checkpointing: bool) -> dict[str, torch.Tensor]:
    controlnet.zero_grad()
    controlnet.enable_gradient_checkpointing(checkpointing)
    x, timestep, context, control, mask = dit_inputs()
    residuals = controlnet(x, timestep, context, control, mask)
    dit(x, timestep, context, mask, block_residuals=residuals).square().mean().backward()
    return {name: p.grad.clone() for name, p in controlnet.named_parameters()}


def test_gradients_flow_and_checkpointing_gives_the_same_ones():
    """With the base frozen: at initialisation only the zero projections learn (ControlNet's
    zero-convolution start: the output projections at once, the input one after them); once
    they are non-zero, every copied block and embedder gets a gradient. Gradient checkpointing
    changes none of them."""
    dit = tiny_dit().requires_grad_(False)
    controlnet = SanaControlNet.from_dit(dit, 2).train()
    fresh = controlnet_gradients(controlnet, dit, checkpointing=False)
    assert all(fresh[f"output_projs.{k}.weight"].abs().max() > 0 for k in range(2))
    assert all(not grad.any() for name, grad in fresh.items() if not name.startswith("output_projs."))
    with torch.no_grad():
        for projection in (controlnet.input_proj, *controlnet.output_projs):
            projection.weight.normal_(0, 0.1)
    grads = [controlnet_gradients(controlnet, dit, checkpointing) for checkpointing in (False, True)]
    assert all(grad.abs().max() > 0 for grad in grads[0].values()), [n for n, g in grads[0].items() if not g.any()]
    assert all(p.grad is None for p in dit.parameters())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_sprint_dits_and_w8a8_dits_cannot_seed_a_controlnet():
    with pytest.raises(SanaInputError, match="no guidance embedding"):
        SanaControlNet(tiny_dit().config.replace(guidance_embeds=True))
    quantized = sana.quantize_w8a8(tiny_dit())
    with pytest.raises(SanaInputError, match="only a float SanaDiT"):
        SanaControlNet.from_dit(quantized, 2)


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def released_width_controlnet(hidden: int, heads: int, cross_heads: int, mlp_ratio: float) -> SanaControlNetModel:
    """A one-block ControlNet at a released width and head layout (narrow MLP to keep it small)."""
    return random_controlnet(
        "600m", num_layers=1, num_attention_heads=heads, attention_head_dim=32, num_cross_attention_heads=cross_heads,
        cross_attention_head_dim=hidden // cross_heads, cross_attention_dim=hidden, caption_channels=2304,
        in_channels=32, out_channels=32, sample_size=32, mlp_ratio=mlp_ratio,
    )


def test_official_release_is_detected_at_the_600m_width(tmp_path):
    """The file exactly as NVlabs releases it (the whole SanaMSControlNet in bf16, base DiT
    included), without a config: width, heads, copied blocks and training size come from the
    weights, and the base's blocks are read past."""
    ref = released_width_controlnet(1152, 36, 16, 2.5)
    base = random_base(ref, num_layers=2)
    path = write_official_release(ref, base, tmp_path / "Sana_600M_1024px_ControlNet_HED.pth", dtype=torch.bfloat16)
    ours = sana.load_controlnet(path)
    cfg = ours.config
    assert (cfg.hidden_size, cfg.cross_attention_heads, cfg.cross_attention_head_dim, cfg.depth) == (1152, 16, 72, 1)
    assert (cfg.caption_channels, cfg.in_channels, cfg.sample_size, cfg.interpolation_scale, cfg.qk_norm) == (2304, 32, 32, None, False)
    assert ours.dtype == torch.bfloat16
    assert cfg == CONTROLNET_PRESETS["sana-600m-1024-controlnet"].replace(depth=1, variant=cfg.variant)
    expected = official_controlnet_state_dict(ref)
    ours_official = controlnet_state_dict(ours, "official")
    assert ours_official.keys() == expected.keys()
    assert all(torch.equal(ours_official[k], expected[k].to(torch.bfloat16)) for k in expected)


def test_official_controlnet_is_detected_at_the_1600m_width(tmp_path):
    """The 1600M head layout (2240 wide: 20 cross-attention heads of 112), from the ControlNet's
    keys alone (the loader ignores the base's anyway)."""
    ref = released_width_controlnet(2240, 70, 20, 0.5)
    path = tmp_path / "controlnet.pth"
    torch.save({"state_dict": {k: v.to(torch.bfloat16) for k, v in official_controlnet_state_dict(ref).items()}}, path)
    cfg = sana.load_controlnet(path).config
    assert (cfg.hidden_size, cfg.cross_attention_heads, cfg.cross_attention_head_dim, cfg.depth, cfg.mlp_ratio) == (2240, 20, 112, 1, 0.5)


def test_presets_are_the_releases():
    for name, preset in CONTROLNET_PRESETS.items():
        base = sana.DIT_PRESETS[name.removesuffix("-controlnet")]
        assert preset.depth == 7 and preset.replace(depth=base.depth, variant=base.variant) == base


def test_controlnet_and_dit_loaders_refuse_each_others_files(tmp_path):
    ref = random_controlnet("600m")
    base = random_base(ref)
    release = write_official_release(ref, base, tmp_path / "release.pth")
    ref.save_pretrained(tmp_path / "cn_diffusers")
    for path in (release, tmp_path / "cn_diffusers"):
        with pytest.raises(SanaCheckpointError, match="is a SANA ControlNet, not a DiT: load it with sana.load_controlnet"):
            sana.load_dit(path, config=config_for(ref).replace(depth=3))
    dit_pth = write_official_pth(base, tmp_path / "dit.pth")
    base.save_pretrained(tmp_path / "dit_diffusers")
    for path in (dit_pth, tmp_path / "dit_diffusers"):
        with pytest.raises(SanaCheckpointError, match="is a SANA DiT, not a ControlNet: load it with sana.load_dit"):
            sana.load_controlnet(path)
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SanaCheckpointError, match="not a SANA ControlNet"):
        sana.load_controlnet(tmp_path / "other.safetensors")


def test_missing_and_misshapen_keys_are_named(tmp_path):
    ref = random_controlnet("600m")
    state = official_controlnet_state_dict(ref)
    del state["controlnet.1.after_proj.bias"]
    state["controlnet.0.copied_block.attn.proj.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": state}, tmp_path / "broken.pth")
    with pytest.raises(SanaCheckpointError) as error:
        sana.load_controlnet(tmp_path / "broken.pth", config=config_for(ref))
    message = str(error.value)
    assert "missing keys (1): ['controlnet.1.after_proj.bias']" in message
    assert "controlnet.0.copied_block.attn.proj.weight: expected [36, 36], found [3, 3]" in message


@pytest.mark.parametrize("fmt", ["diffusers", "official"])
def test_save_round_trips_bit_exactly_and_diffusers_reads_it(fmt, tmp_path):
    ref = random_controlnet("1600m")
    ref.save_pretrained(tmp_path / "in")
    ours = sana.load_controlnet(tmp_path / "in")
    target = tmp_path / ("out" if fmt == "diffusers" else "out.pth")
    save_controlnet(ours, target, format=fmt)
    again = sana.load_controlnet(target)
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))
    if fmt == "diffusers":
        theirs = SanaControlNetModel.from_pretrained(str(target)).eval()
        assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_non_finite_weights_are_never_saved(tmp_path):
    ref = random_controlnet("600m")
    ref.save_pretrained(tmp_path / "in")
    ours = sana.load_controlnet(tmp_path / "in")
    with torch.no_grad():
        ours.output_projs[1].weight[0, 0] = float("nan")
    with pytest.raises(SanaNonFiniteError, match=r"output_projs\.1\.weight"):
        save_controlnet(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_official_release_keys_follow_the_conversion_script():
    """Spot checks of the reverse key table against diffusers' converter (its source keys)."""
    ref = random_controlnet("600m")
    state = official_controlnet_state_dict(ref)
    assert torch.equal(state["controlnet.0.before_proj.weight"], ref.input_block.weight)
    assert torch.equal(state["controlnet.1.after_proj.bias"], ref.controlnet_blocks[1].bias)
    q, k, v = state["controlnet.1.copied_block.attn.qkv.weight"].chunk(3)
    assert torch.equal(k, ref.transformer_blocks[1].attn1.to_k.weight)
    assert state["controlnet.0.copied_block.mlp.point_conv.conv.weight"].ndim == 4
    assert not any(key.startswith("blocks.") for key in state)
    release = official_state_dict(random_base(ref))
    assert "blocks.2.attn.qkv.weight" in release and "final_layer.linear.weight" in release
