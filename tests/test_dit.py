"""SANA DiT: parity with diffusers' SanaTransformer2DModel for every variant and checkpoint format."""

from __future__ import annotations

import pytest
import torch
from diffusers import SanaTransformer2DModel
from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers
from safetensors.torch import load_file

import sana
from dit_checkpoints import (
    VARIANTS,
    inputs,
    official_state_dict,
    random_reference,
    write_diffusers_single_file,
    write_official_pth,
    write_official_safetensors,
)
from sana.dit_io import config_from_diffusers, dit_state_dict


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def reference_forward(ref, x, timestep, context, mask, guidance=None):
    scale = ref.config.guidance_embeds_scale
    with torch.no_grad():
        return ref(
            x, context, timestep, guidance=None if guidance is None else guidance * scale, encoder_attention_mask=mask
        ).sample


def write_checkpoint(ref, fmt: str, tmp_path):
    """Write `ref` in `fmt`; returns (path, config to pass or None)."""
    if fmt == "diffusers-folder":
        ref.save_pretrained(tmp_path / "transformer")
        return tmp_path / "transformer", None
    if fmt == "pipeline-root":
        ref.save_pretrained(tmp_path / "pipe" / "transformer")
        return tmp_path / "pipe", None
    if fmt == "diffusers-sharded":
        ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
        assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
        return tmp_path / "sharded", None
    # Bare files carry no head counts at tiny width: the config comes from the caller.
    config = config_from_diffusers(dict(ref.config))
    if fmt == "diffusers-file":
        return write_diffusers_single_file(ref, tmp_path / "model.safetensors"), config
    if fmt == "official-pth":
        return write_official_pth(ref, tmp_path / "model.pth"), config
    if fmt == "official-bare-pth":
        return write_official_pth(ref, tmp_path / "model.pth", wrapped=False), config
    if fmt == "comfy-official":
        return write_official_safetensors(ref, tmp_path / "comfy.safetensors", prefix="model.diffusion_model."), config
    if fmt == "comfy-diffusers":
        return write_diffusers_single_file(ref, tmp_path / "comfy.safetensors", prefix="model.diffusion_model."), config
    raise AssertionError(fmt)


FORMATS = [
    "diffusers-folder",
    "pipeline-root",
    "diffusers-sharded",
    "diffusers-file",
    "official-pth",
    "official-bare-pth",
    "comfy-official",
    "comfy-diffusers",
]


def sprint_inputs(ref, timestep):
    if ref.config.guidance_embeds:
        return torch.tensor([0.999, 0.4]), torch.tensor([4.5, 3.0])  # Sprint feeds the flow time as a float
    return timestep, None


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_parity_every_variant_and_format(variant, fmt, tmp_path):
    ref = random_reference(variant)
    path, config = write_checkpoint(ref, fmt, tmp_path)
    ours = sana.load_dit(path, config=config)
    assert ours.config.interpolation_scale == ref.config.interpolation_scale
    assert ours.config.qk_norm == (ref.config.qk_norm is not None)
    assert ours.config.guidance_embeds == ref.config.guidance_embeds

    x, timestep, context, mask = inputs(ref)
    timestep, guidance = sprint_inputs(ref, timestep)
    expected = reference_forward(ref, x, timestep, context, mask, guidance)
    with torch.no_grad():
        got = ours(x, timestep, context, mask, guidance=guidance)
    assert got.shape == expected.shape == x.shape
    assert rel_err(got, expected) <= 1e-5


# bf16 at the released head size (32): with 4-wide heads the linear-attention denominators
# come close to zero and bf16 itself (diffusers' too) drifts >10% from fp32.
RELEASED_HEAD_SIZE = dict(
    attention_head_dim=32, num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=32,
    cross_attention_dim=64, caption_channels=32,
)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_parity(variant, seed, tmp_path):
    ref = random_reference(variant, seed=seed, **RELEASED_HEAD_SIZE)
    ref.save_pretrained(tmp_path)
    ours = sana.load_dit(tmp_path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    x, timestep, context, mask = inputs(ref, height=12, width=16, length=20)
    timestep, guidance = sprint_inputs(ref, timestep)
    expected = reference_forward(ref.to(torch.bfloat16), x.bfloat16(), timestep, context.bfloat16(), mask, guidance)
    with torch.no_grad():
        got = ours(x.bfloat16(), timestep, context.bfloat16(), mask, guidance=guidance)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, expected) <= 2e-2


@pytest.mark.parametrize("variant", ["sana", "sana-4k-pe"])
def test_parity_without_mask_square_and_long_context(variant, tmp_path):
    ref = random_reference(variant)
    ref.save_pretrained(tmp_path)
    ours = sana.load_dit(tmp_path)
    for height, width, length in ((8, 8, 1), (16, 4, 33), (5, 3, 300)):
        x, timestep, context, _ = inputs(ref, height=height, width=width, length=length)
        expected = reference_forward(ref, x, timestep, context, None)
        with torch.no_grad():
            got = ours(x, timestep, context)
        assert rel_err(got, expected) <= 1e-5, (height, width, length)


def test_test_official_writer_agrees_with_diffusers_converter():
    """The tests' official writer is the inverse of diffusers' own single-file converter."""
    ref = random_reference("sana")
    back = convert_sana_transformer_to_diffusers(dict(official_state_dict(ref)))
    expected = ref.state_dict()
    assert set(back) == set(expected)
    for key in expected:
        assert torch.equal(back[key], expected[key]), key


def test_trimming_padded_context_is_exact_and_handles_fully_masked_rows(tmp_path):
    ref = random_reference("sana-1.5")
    ref.save_pretrained(tmp_path)
    ours = sana.load_dit(tmp_path)
    x, timestep, context, mask = inputs(ref, length=12)
    mask[:, 8:] = 0  # trailing columns every row masks out
    with torch.no_grad():
        trimmed = ours(x, timestep, context, mask)
        ours.trim_padded_context = False
        full = ours(x, timestep, context, mask)
    assert rel_err(trimmed, full) <= 1e-6
    # A fully masked row attends to every token through logits offset by −10000, which keep
    # only ~1e-3 absolute precision in fp32: diffusers' semantics (no NaN, no trimming), at that precision.
    mask[1] = 0
    expected = reference_forward(ref, x, timestep, context, mask)
    ours.trim_padded_context = True
    with torch.no_grad():
        got = ours(x, timestep, context, mask)
    assert torch.isfinite(got).all()
    assert rel_err(got[0], expected[0]) <= 1e-5
    assert rel_err(got[1], expected[1]) <= 1e-3


@pytest.mark.parametrize("variant", ["sana", "sana-1.5"])
def test_forward_traces_as_one_graph_with_a_mask(tmp_path, variant):
    """torch.compile(fullgraph=True) of a plain call (trimming on by default, as ComfyUI's
    TorchCompileModel calls it): inside a graph the data-dependent trim is skipped, not a break."""
    import torch._dynamo

    ref = random_reference(variant)
    ref.save_pretrained(tmp_path)
    ours = sana.load_dit(tmp_path)
    x, timestep, context, mask = inputs(ref, length=12)
    mask[:, 8:] = 0
    torch._dynamo.reset()
    traced = torch.compile(ours, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert rel_err(traced(x, timestep, context, mask), ours(x, timestep, context, mask)) <= 1e-6


def test_scalar_timestep_broadcasts(tmp_path):
    ref = random_reference("sana")
    ref.save_pretrained(tmp_path)
    ours = sana.load_dit(tmp_path)
    x, _, context, mask = inputs(ref)
    with torch.no_grad():
        a = ours(x, torch.tensor(500), context, mask)
        b = ours(x, torch.tensor([500, 500]), context, mask)
    assert torch.equal(a, b)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    ref = random_reference("sana-1.5")
    ref.save_pretrained(tmp_path)
    x, timestep, context, mask = inputs(ref)
    grads = []
    for checkpointing in (False, True):
        model = sana.load_dit(tmp_path).train()
        model.enable_gradient_checkpointing(checkpointing)
        model(x, timestep, context, mask).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(g.abs().max() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_sprint_requires_guidance(tmp_path):
    ref = random_reference("sana-sprint")
    ref.save_pretrained(tmp_path)
    ours = sana.load_dit(tmp_path)
    x, timestep, context, mask = inputs(ref)
    with pytest.raises(ValueError, match="guidance"):
        ours(x, timestep, context, mask)


def test_wrong_input_shapes_are_named(tmp_path):
    ref = random_reference("sana")
    ref.save_pretrained(tmp_path)
    ours = sana.load_dit(tmp_path)
    x, timestep, context, mask = inputs(ref)
    with pytest.raises(ValueError, match="caption_channels"):
        ours(x, timestep, context[..., :5], mask)
    with pytest.raises(ValueError, match="channels"):
        ours(x[:, :2], timestep, context, mask)
    with pytest.raises(ValueError, match="context_mask"):
        ours(x, timestep, context, mask[:, :3])


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------

TRAINING_ONLY = ("y_embedder.y_embedding", "logvar_linear.weight", "logvar_linear.bias")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_diffusers_round_trip_is_bit_exact(variant, tmp_path):
    ref = random_reference(variant)
    original = official_state_dict(ref)
    torch.save({"state_dict": original}, tmp_path / "a.pth")
    model = sana.load_dit(tmp_path / "a.pth", config=config_from_diffusers(dict(ref.config)))

    sana.save_dit(model, tmp_path / "diffusers", format="diffusers")
    written = load_file(str(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"))
    expected = ref.state_dict()
    assert set(written) == set(expected)
    for key in expected:
        assert torch.equal(written[key], expected[key]), key

    again = sana.load_dit(tmp_path / "diffusers")
    assert again.config == model.config
    sana.save_dit(again, tmp_path / "b.pth", format="official")
    back = torch.load(tmp_path / "b.pth", weights_only=True)["state_dict"]
    for key, tensor in original.items():
        if key not in TRAINING_ONLY:  # those do not survive the diffusers layout
            assert torch.equal(back[key], tensor), key

    sana.save_dit(model, tmp_path / "c.pth", format="official")  # official → official keeps them too
    kept = torch.load(tmp_path / "c.pth", weights_only=True)["state_dict"]
    assert set(kept) == set(original)
    for key, tensor in original.items():
        assert torch.equal(kept[key], tensor), key


def test_official_safetensors_and_sharded_saves_round_trip(tmp_path):
    ref = random_reference("sana-sprint")
    config = config_from_diffusers(dict(ref.config))
    model = sana.load_dit(write_official_pth(ref, tmp_path / "m.pth"), config=config)
    sana.save_dit(model, tmp_path / "official.safetensors", format="official")
    sana.save_dit(model, tmp_path / "single.safetensors", format="diffusers")
    sana.save_dit(model, tmp_path / "sharded", format="diffusers", max_shard_bytes=4096)
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    reference = dit_state_dict(model, "official")
    for path in ("official.safetensors", "single.safetensors", "sharded"):
        loaded = sana.load_dit(tmp_path / path)  # the config travels in the metadata / config.json
        assert loaded.config == model.config
        for key, tensor in dit_state_dict(loaded, "official").items():
            assert torch.equal(tensor, reference[key]), (path, key)
    # re-saving unsharded removes the stale shards of the earlier save
    sana.save_dit(model, tmp_path / "sharded", format="diffusers")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    sana.load_dit(tmp_path / "sharded")


def test_diffusers_reads_what_we_save(tmp_path):
    ref = random_reference("sana-1.5")
    ref.save_pretrained(tmp_path / "ref")
    sana.save_dit(sana.load_dit(tmp_path / "ref"), tmp_path / "ours")
    reloaded = SanaTransformer2DModel.from_pretrained(tmp_path / "ours").eval()
    x, timestep, context, mask = inputs(ref)
    assert torch.equal(reference_forward(reloaded, x, timestep, context, mask), reference_forward(ref, x, timestep, context, mask))


def test_dtype_and_device_arguments(tmp_path):
    ref = random_reference("sana")
    ref.save_pretrained(tmp_path)
    model = sana.load_dit(tmp_path, dtype=torch.float16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training


def test_fp16_parity_and_overflow_clip(tmp_path):
    """fp16 matches diffusers within diffusers' own fp16 tolerance, and the linear attention clips at ±65504."""
    ref = random_reference("sana", **RELEASED_HEAD_SIZE)
    ref.save_pretrained(tmp_path)
    ours = sana.load_dit(tmp_path, dtype=torch.float16)
    x, timestep, context, mask = inputs(ref, height=12, width=16, length=20)
    expected = reference_forward(ref.to(torch.float16), x.half(), timestep, context.half(), mask)
    with torch.no_grad():
        got = ours(x.half(), timestep, context.half(), mask)
    assert got.dtype == torch.float16
    assert rel_err(got, expected) <= 0.08  # diffusers' fp16 pipeline tolerance

    attn = ours.blocks[0].attn
    with torch.no_grad():  # force an overflow: half the outputs +inf, half -inf
        attn.proj.weight.zero_()
        attn.proj.bias.copy_(torch.tensor([float("inf"), float("-inf")]).repeat(attn.proj.out_features // 2))
        out = attn(torch.randn(1, 4, attn.proj.in_features, dtype=torch.float16))
    assert out[..., 0::2].eq(65504).all() and out[..., 1::2].eq(-65504).all()


def test_pos_embed_for_mps_is_built_on_the_cpu(monkeypatch):
    """MPS has no float64 (a known Apple pitfall): for an MPS device the 2K/4K sincos table is built
    on the CPU and moved, with the CPU table's numbers. This machine has no MPS, so the move is recorded."""
    from sana.dit import sincos_pos_embed_2d

    expected = sincos_pos_embed_2d(64, 6, 10, 8, 2.0)
    built_on, moved_to = [], []
    real_arange, real_to = torch.arange, torch.Tensor.to

    def arange(*args, **kwargs):
        built_on.append(torch.device(kwargs.get("device") or "cpu").type)
        return real_arange(*args, **kwargs)

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "mps":
            moved_to.append(args[0].type)
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch, "arange", arange)
    monkeypatch.setattr(torch.Tensor, "to", to)
    table = sincos_pos_embed_2d(64, 6, 10, 8, 2.0, device="mps")
    monkeypatch.undo()
    assert set(built_on) == {"cpu"} and moved_to == ["mps"]
    assert torch.equal(table, expected)
