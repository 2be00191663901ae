"""DC-AE: parity with diffusers' AutoencoderDC, both weight layouts, detection, errors, tiling, training.

Every model here is a reduced-width copy of a released layout with random weights (norms,
biases and BatchNorm statistics included); diffusers 0.42.1 is the numerical reference.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sana.checkpoint import CheckpointReader, TensorInfo, write_safetensors, write_torch
from sana.dcae import (
    DCAE,
    DCAE_PRESETS,
    DCAEConfig,
    DownBlock,
    RMSNorm2d,
    UpBlock,
    nearest_upsample_conv,
    nearest_upsample_conv_reference,
    relu_linear_attention_multiscale,
)
from sana.dcae_io import (
    config_from_diffusers,
    detect_layout,
    diffusers_config,
    file_shapes,
    load_dcae,
    resolve_config,
    save_dcae,
    state_in_layout,
    validate_checkpoint,
)
from sana.dcae_tiling import blend_weights, estimate_peak_bytes, plan_tiling, tile_spans, tiled_apply
from sana.errors import SanaCheckpointError, SanaInputError

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderDC  # noqa: E402
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers  # noqa: E402

torch.set_num_threads(2)
RTOL = 1e-5
# Measured with bench/dcae.py (docs/BENCHMARKS.md): tiled vs untiled decode of the smooth test
# image with the small SANA-layout model below, 11×7 latents, 128 px tiles, 32 px overlap.
TILED_DECODE_MIN_PSNR_DB = 25.0

# Reduced-width copies of the released layouts, as diffusers AutoencoderDC kwargs.
SANA_SMALL = dict(
    latent_channels=16,
    attention_head_dim=8,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[8, 16, 32, 32, 64, 64],
    decoder_block_out_channels=[8, 16, 32, 32, 64, 64],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
    decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)
INMIX_SMALL = dict(
    latent_channels=16,
    attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[8, 16, 32, 32, 64, 64],
    decoder_block_out_channels=[8, 16, 32, 32, 64, 64],
    encoder_layers_per_block=[0, 4, 8, 2, 2, 2],
    decoder_layers_per_block=[0, 5, 10, 2, 2, 2],
    encoder_qkv_multiscales=[[]] * 6,
    decoder_qkv_multiscales=[[]] * 6,
    upsample_block_type="pixel_shuffle",
    downsample_block_type="pixel_unshuffle",
    decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 3,
    decoder_act_fns=["relu"] * 3 + ["silu"] * 3,
    scaling_factor=0.4552,
)
LAYOUTS = {"sana": SANA_SMALL, "inmix": INMIX_SMALL}


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random norm affines and BatchNorm statistics on top of PyTorch's random conv init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return module


def reference(layout: str, seed: int = 0) -> AutoencoderDC:
    torch.manual_seed(seed)
    return randomize(AutoencoderDC(**LAYOUTS[layout]), seed).eval()


def smooth_image(height: int, width: int, batch: int = 1) -> torch.Tensor:
    """Low-frequency colour gradients in [-1, 1]: the case where tiling seams would show most."""
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    channels = [
        0.6 * torch.sin(2 * math.pi * (a * x + b * y) + phase) + 0.3 * (x - y)
        for a, b, phase in ((1.0, 0.5, 0.0), (0.7, 1.3, 1.0), (1.6, 0.4, 2.0))
    ]
    return torch.stack(channels)[None].repeat(batch, 1, 1, 1).clamp(-1, 1)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def psnr(got: torch.Tensor, ref: torch.Tensor) -> float:
    peak = (ref.max() - ref.min()).item()
    return 10 * math.log10(peak**2 / (got.double() - ref.double()).pow(2).mean().item())


@pytest.fixture(scope="module")
def sana_model(tmp_path_factory) -> tuple[AutoencoderDC, DCAE]:
    ref = reference("sana")
    folder = tmp_path_factory.mktemp("sana") / "dcae"
    ref.save_pretrained(folder)
    return ref, load_dcae(folder)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layout", ["sana", "inmix"])
def test_parity_with_diffusers_through_both_formats(layout, tmp_path):
    """diffusers -> (diffusers folder) -> ours -> (original file) -> ours: encode and decode match diffusers."""
    ref = reference(layout, seed=1)
    ref.save_pretrained(tmp_path / "diffusers")
    from_diffusers = load_dcae(tmp_path / "diffusers")
    save_dcae(from_diffusers, tmp_path / "original.safetensors", layout="original")
    from_original = load_dcae(tmp_path / "original.safetensors")
    images = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        ref_latents = ref.encode(images).latent
        ref_images = ref.decode(ref_latents).sample
        for ours in (from_diffusers, from_original):
            assert ours.scaling_factor == LAYOUTS[layout]["scaling_factor"]
            assert ours.spatial_compression == 32 and ours.latent_channels == 16
            latents = ours.encode(images)
            assert latents.shape == (2, 16, 4, 3)
            assert rel_err(latents, ref_latents) <= RTOL
            assert rel_err(ours.decode(ref_latents), ref_images) <= RTOL


def test_diffusers_reads_what_we_write(tmp_path, sana_model):
    """Our diffusers folder loads in AutoencoderDC.from_pretrained, our original file in its single-file converter."""
    ref, ours = sana_model
    save_dcae(ours, tmp_path / "folder")
    save_dcae(ours, tmp_path / "model.safetensors")
    from_folder = AutoencoderDC.from_pretrained(tmp_path / "folder")
    from_single = AutoencoderDC.from_single_file(tmp_path / "model.safetensors", config=str(tmp_path / "folder"),
                                                 local_files_only=True)
    expected = ref.state_dict()
    for model in (from_folder, from_single):
        state = model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert from_folder.config.scaling_factor == ref.config.scaling_factor


@pytest.mark.parametrize("preset", sorted(DCAE_PRESETS))
def test_release_key_tables(preset):
    """Released layouts: key counts and parameter counts from the spec; the original names are the
    ones diffusers' own converter turns into exactly the AutoencoderDC state dict."""
    config = DCAE_PRESETS[preset]
    with torch.device("meta"):
        model = DCAE(config)
        reference_model = AutoencoderDC(**{k: v for k, v in diffusers_config(config).items() if not k.startswith("_")})
    family = preset.split("-")[2]
    counts = {"f32c32": (339, 312_250_275) if "sana" in preset else (338, 323_356_460),
              "f64c128": (386, 676_896_140), "f128c512": (434, 1_120_682_252)}[family]
    original = state_in_layout(model, "original")
    assert (len(original), model.num_parameters()) == counts
    converted = convert_autoencoder_dc_checkpoint_to_diffusers(dict(original))
    expected = {k: tuple(v.shape) for k, v in reference_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert file_shapes(config, "diffusers") == expected


def test_bf16_model_attention_stays_fp32(sana_model, tmp_path):
    """A bf16 model returns bf16 and is as close to fp32 as diffusers' bf16 model (which also keeps
    the attention in fp32); the attention function itself computes in fp32 for any input dtype."""
    ref, ours = sana_model
    save_dcae(ours, tmp_path / "m.safetensors")
    ours_half = load_dcae(tmp_path / "m.safetensors", dtype=torch.bfloat16)
    ref_half = AutoencoderDC.from_config(ref.config).to(torch.bfloat16).eval()
    ref_half.load_state_dict(ref.state_dict())
    z = torch.randn(2, 16, 4, 3, generator=torch.Generator().manual_seed(3))

    def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.float() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()

    with torch.inference_mode():
        full = ref.decode(z).sample
        out = ours_half.decode(z)
        assert out.dtype == torch.bfloat16
        assert rel_rms(out, full) <= 1.5 * rel_rms(ref_half.decode(z.bfloat16()).sample, full) + 0.005
    qkv = torch.randn(2, 3 * 8 * 4, 6, 7).to(torch.bfloat16)
    attended = relu_linear_attention_multiscale(qkv, 8)
    assert attended.dtype == torch.bfloat16
    assert torch.equal(attended, relu_linear_attention_multiscale(qkv.float(), 8).to(torch.bfloat16))


# --------------------------------------------------------------------------- ops


def test_attention_matches_softmax_free_formula():
    """Both code paths (N > d linear, N <= d quadratic) equal Σ_j v_j (k_j·q_i) / Σ_j k_j·q_i in float64."""
    g = torch.Generator().manual_seed(4)
    for height, width in ((5, 7), (2, 3)):  # 35 > 8 and 6 <= 8 pixels, head dim 8
        qkv = torch.randn(2, 3 * 8 * 4, height, width, generator=g)
        got = relu_linear_attention_multiscale(qkv, 8)
        q, k, v = qkv.double().reshape(2, 4, 24, -1).split(8, dim=2)
        weights = torch.einsum("bgdj,bgdi->bgji", k.relu(), q.relu())
        expected = torch.einsum("bgdj,bgji->bgdi", v, weights) / weights.sum(2, keepdim=True)
        assert (got.double() - expected.reshape(2, 32, height, width)).abs().max() < 1e-5


def test_resampling_shortcuts_follow_the_spec():
    x = torch.randn(1, 4, 6, 8)
    down = DownBlock(4, 4, pixel_unshuffle=False, shortcut=True)
    torch.nn.init.zeros_(down.conv.weight), torch.nn.init.zeros_(down.conv.bias)
    assert torch.allclose(down(x), F.avg_pool2d(x, 2), atol=1e-6)  # group 4 = 2×2 averaging
    down = DownBlock(4, 8, pixel_unshuffle=True, shortcut=True)
    torch.nn.init.zeros_(down.conv.weight), torch.nn.init.zeros_(down.conv.bias)
    # group 2: out[2c+i] = mean_j x[c, 2h+i, 2w+j]
    expected = x.unflatten(2, (3, 2)).unflatten(4, (4, 2)).mean(dim=5).permute(0, 1, 3, 2, 4).reshape(1, 8, 3, 4)
    assert torch.allclose(down(x), expected, atol=1e-6)
    up = UpBlock(4, 4, interpolate=True, shortcut=True)
    torch.nn.init.zeros_(up.conv.weight), torch.nn.init.zeros_(up.conv.bias)
    assert torch.equal(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))  # repeats 4 = nearest ×2
    up = UpBlock(4, 2, interpolate=False, shortcut=True)
    torch.nn.init.zeros_(up.conv.weight), torch.nn.init.zeros_(up.conv.bias)
    out = up(x)  # repeats 2: out[m, 2h+i, 2w+j] = x[2m+i, h, w]
    for m in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(out[0, m, i::2, j::2], x[0, 2 * m + i])


@pytest.mark.parametrize(("c_in", "c_out", "repeats"), [(6, 3, 2), (4, 4, 4), (8, 2, 1), (2, 4, 8), (4, 3, 3), (5, 7, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_upsample_conv_matches_interpolate_then_conv(c_in, c_out, repeats, channels_last):
    """The folded nearest ×2 + 3×3 conv (four 2×2 convs on the low-res map) against the layer as
    written, with every shortcut repeat count (slice and index paths), odd sides, both layouts,
    forward and backward."""
    gen = torch.Generator().manual_seed(c_in * 10 + c_out)
    x = torch.randn(2, c_in, 5, 7, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen) / 4
    bias = torch.randn(c_out, generator=gen)
    grad_out = torch.randn(2, c_out, 10, 14, generator=gen)
    results = []
    for fn in (nearest_upsample_conv, nearest_upsample_conv_reference):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(*leaves, repeats)
        out.backward(grad_out)
        results.append((out, *(t.grad for t in leaves)))
    (got, *got_grads), (want, *want_grads) = results
    assert got.shape == want.shape == (2, c_out, 10, 14)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("x", "weight", "bias"), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")
    # bf16: the folded taps are summed in fp32 and rounded once, so the error stays bf16-sized.
    got16 = nearest_upsample_conv(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), repeats).float()
    want16 = nearest_upsample_conv_reference(x.bfloat16().float(), weight.bfloat16().float(), bias.bfloat16().float(), repeats)
    assert (got16 - want16).abs().max() <= 2e-2 * want16.abs().max()


def test_rms_norm_2d_formula():
    norm = randomize(RMSNorm2d(6))
    x = torch.randn(2, 6, 3, 4)
    expected = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5) * norm.weight[:, None, None] + norm.bias[:, None, None]
    assert torch.allclose(norm(x), expected, atol=1e-6)


# --------------------------------------------------------------------------- inputs


def test_bad_inputs_raise(sana_model):
    _, ours = sana_model
    with pytest.raises(SanaInputError, match="multiples of the compression 32.*65×64"):
        ours.encode(torch.zeros(1, 3, 65, 64))
    with pytest.raises(SanaInputError, match="expected 3 channels"):
        ours.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(SanaInputError, match=r"expected 16 channels"):
        ours.decode(torch.zeros(1, 32, 2, 2))
    with pytest.raises(SanaInputError, match=r"\[B, 16, H, W\]"):
        ours.decode(torch.zeros(16, 2, 2))
    with pytest.raises(SanaInputError, match="tile_size must be a multiple of the compression 32"):
        ours.decode(torch.zeros(1, 16, 8, 8), tile_size=100)
    with pytest.raises(SanaInputError, match="more than half"):
        ours.decode(torch.zeros(1, 16, 8, 8), tile_size=128, tile_overlap=96)


# --------------------------------------------------------------------------- training


def test_gradients_flow_and_checkpointing_matches():
    torch.manual_seed(5)
    config = config_from_diffusers(INMIX_SMALL | {"encoder_layers_per_block": [0, 1, 1, 1, 1, 1],
                                                  "decoder_layers_per_block": [0, 1, 1, 1, 1, 1]})
    model = randomize(DCAE(config)).train()
    images = torch.rand(2, 3, 64, 64) * 2 - 1

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(6)
        (model(images) - images).abs().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    missing = [n for n, g in plain.items() if g is None or not g.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert all(torch.allclose(plain[n], checkpointed[n], rtol=1e-4, atol=1e-7) for n in plain)


# --------------------------------------------------------------------------- tiling


def test_tile_grid_covers_with_full_tiles_and_weights_sum_to_one():
    for length, tile, overlap in ((11, 4, 1), (7, 4, 1), (128, 32, 8), (40, 32, 8), (5, 8, 2), (33, 16, 4)):
        spans = tile_spans(length, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(end - start == min(tile, length) for start, end in spans)
        assert all(prev_end - start >= overlap for (_, prev_end), (start, _) in zip(spans, spans[1:]))
        total = torch.zeros(length * 4)
        for (start, _), w in zip(spans, blend_weights(spans, 4, torch.device("cpu"))):
            assert (w > 0).all()
            total[start * 4 : start * 4 + w.numel()] += w
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_tiling_is_exact_for_a_local_network():
    """With a network that has no spatial context, tiled output must equal untiled output."""
    upsample = lambda z: F.interpolate(z, scale_factor=8, mode="nearest") * 2 + 1  # noqa: E731
    z = torch.randn(2, 3, 11, 7)
    assert torch.allclose(tiled_apply(upsample, z, "decode", 8, 4, 1), upsample(z), atol=1e-6)
    downsample = lambda x: F.avg_pool2d(x, 8) - 1  # noqa: E731
    x = torch.randn(1, 3, 88, 56)
    assert torch.allclose(tiled_apply(downsample, x, "encode", 8, 4, 1), downsample(x), atol=1e-6)


def test_tiled_decode_of_odd_sized_latent_matches_untiled(sana_model):
    """11×7 latents (not a multiple of the 4-latent tile): tiled ≈ untiled within the documented PSNR."""
    _, ours = sana_model
    with torch.inference_mode():
        latents = ours.encode(smooth_image(352, 224))
        assert latents.shape[-2:] == (11, 7)
        untiled = ours.decode(latents, memory_budget=1 << 40)
        tiled = ours.decode(latents, tile_size=128, tile_overlap=32)
        tiled_latents = ours.encode(smooth_image(352, 224), tile_size=128, tile_overlap=32)
    assert tiled.shape == untiled.shape == (1, 3, 352, 224)
    assert not torch.equal(tiled, untiled)  # the attention is global: tiles do change the result
    assert psnr(tiled, untiled) >= TILED_DECODE_MIN_PSNR_DB
    assert tiled_latents.shape == latents.shape and psnr(tiled_latents, latents) >= 15.0


def test_memory_budget_picks_slicing_then_tiling(sana_model):
    _, ours = sana_model
    latents = torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(7))
    full = estimate_peak_bytes(ours.config, "decode", 2, 12, 12, torch.float32)
    one = estimate_peak_bytes(ours.config, "decode", 1, 12, 12, torch.float32)
    assert one < full and estimate_peak_bytes(ours.config, "decode", 1, 4, 4, torch.float32) < one / 3
    shape = tuple(latents.shape)
    assert plan_tiling(ours, "decode", shape, memory_budget=full) == (2, None, 0)
    assert plan_tiling(ours, "decode", shape, memory_budget=one) == (1, None, 0)
    chunk, tile, overlap = plan_tiling(ours, "decode", shape, memory_budget=one // 4)
    assert tile == 8 and overlap == 2  # the 256 px floor, with the default overlap ratio (1/4)
    with torch.inference_mode():
        untiled = ours.decode(latents, memory_budget=full)
        sliced = ours.decode(latents, memory_budget=one)
        tiled = ours.decode(latents, memory_budget=one // 4)
    assert rel_err(sliced, untiled) <= 1e-4  # image by image: the same function (batched conv rounding aside)
    assert tiled.shape == untiled.shape and not torch.equal(tiled, untiled)


def test_progress_counts_every_network_call_of_the_plan(sana_model):
    """`progress(done, total)` before the first call and after each chunk or tile, over the plan's
    own count; reporting changes nothing in the result (the same calls, hence exactly)."""
    _, ours = sana_model
    latents = torch.randn(2, 16, 11, 7, generator=torch.Generator().manual_seed(3))
    one = estimate_peak_bytes(ours.config, "decode", 1, 11, 7, torch.float32)
    one_tile = estimate_peak_bytes(ours.config, "decode", 1, 4, 4, torch.float32)
    cases = (
        (dict(memory_budget=1 << 40), 1),  # the whole batch at once
        (dict(memory_budget=one), 2),  # image by image
        # Tile by tile, image by image: a budget of one 4×4-latent tile pins the chunk to one image
        # (left to the memory free now, the plan may take both images per tile at once).
        (dict(tile_size=128, tile_overlap=32, memory_budget=one_tile), 2 * len(tile_spans(11, 4, 1)) * len(tile_spans(7, 4, 1))),
    )
    with torch.inference_mode():
        for tiling, calls in cases:
            reports = []
            reported = ours.decode(latents, progress=lambda done, total: reports.append((done, total)), **tiling)
            assert reports == [(done, calls) for done in range(calls + 1)], tiling
            assert torch.equal(reported, ours.decode(latents, **tiling))
        reports = []
        ours.encode(smooth_image(352, 224), tile_size=128, tile_overlap=32, progress=lambda *r: reports.append(r))
    tiles = len(tile_spans(11, 4, 1)) * len(tile_spans(7, 4, 1))
    assert reports == [(done, tiles) for done in range(tiles + 1)]


# --------------------------------------------------------------------------- formats and detection


def test_round_trips_are_bit_exact(tmp_path, sana_model):
    _, ours = sana_model
    expected = ours.state_dict()
    paths = {
        "original.safetensors": "original",
        "original.pt": "original",
        "diffusers_folder": "diffusers",
        "diffusers_single.safetensors": "diffusers",
    }
    for name, layout in paths.items():
        save_dcae(ours, tmp_path / name, layout=layout)
        loaded = load_dcae(tmp_path / name)
        assert loaded.config == ours.config
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), name
    half = load_dcae(tmp_path / "original.pt", dtype=torch.bfloat16)
    assert half.encoder.conv_in.weight.dtype == torch.bfloat16


def test_detects_architecture_from_bare_original_weights(tmp_path):
    """Files from mit-han-lab carry no config: the architecture comes from key names and shapes."""
    for layout, seed in (("sana", 8), ("inmix", 9)):
        ref = reference(layout, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = load_dcae(_save_reference(ref, tmp_path / layout))
        bare = state_in_layout(ours, "original")
        write_safetensors(tmp_path / f"{layout}.safetensors", bare)  # no metadata
        write_torch(tmp_path / f"{layout}.pt", {"state_dict": {"vae." + k: v for k, v in bare.items()}})
        for path in (tmp_path / f"{layout}.safetensors", tmp_path / f"{layout}.pt"):
            with pytest.warns(UserWarning, match="scaling_factor is unknown"):
                loaded = load_dcae(path)
            assert loaded.config.replace(scaling_factor=0.0) == ours.config.replace(scaling_factor=0.0, name="custom")
            images = torch.rand(1, 3, 64, 32) * 2 - 1
            with torch.inference_mode():
                assert rel_err(loaded.encode(images), ref.encode(images).latent) <= RTOL
        with pytest.warns(UserWarning):  # diffusers-layout single file, no config
            diffusers_layout = {k: v for k, v in ref.state_dict().items()}
            write_safetensors(tmp_path / f"{layout}_df.safetensors", diffusers_layout)
            loaded = load_dcae(tmp_path / f"{layout}_df.safetensors")
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))


def _save_reference(ref: AutoencoderDC, folder: Path) -> Path:
    ref.save_pretrained(folder)
    return folder


def _fake_reader(path: str, shapes: dict[str, tuple[int, ...]]) -> CheckpointReader:
    infos = {k: TensorInfo(s, torch.float32) for k, s in shapes.items()}
    return CheckpointReader(Path(path), "safetensors", infos, lambda k: torch.zeros(infos[k].shape))


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_detects_every_release_and_its_scaling_factor(layout):
    def detect(path: str, preset: str, config=None) -> DCAEConfig:
        reader = _fake_reader(path, file_shapes(DCAE_PRESETS[preset], layout))
        assert detect_layout(reader) == layout
        return resolve_config(reader, layout, config)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detect("/m/model.safetensors", "dc-ae-f32c32-sana-1.0").scaling_factor == 0.41407
        assert detect("/m/dc-ae-f32c32-sana-1.1/model.safetensors", "dc-ae-f32c32-sana-1.0").name == "dc-ae-f32c32-sana-1.1"
        assert detect("/m/dc-ae-f64c128-in-1.0/model.safetensors", "dc-ae-f64c128-in-1.0").scaling_factor == 0.2889
        assert detect("/m/x.safetensors", "dc-ae-f32c32-mix-1.0", "dc-ae-f32c32-in-1.0").scaling_factor == 0.3189
    for preset, mix_factor in (("dc-ae-f32c32-in-1.0", 0.4552), ("dc-ae-f64c128-in-1.0", 0.4538),
                               ("dc-ae-f128c512-in-1.0", 0.3620)):
        with pytest.warns(UserWarning, match="cannot be told apart"):
            found = detect("/m/model.safetensors", preset)
        assert found.scaling_factor == mix_factor and found == DCAE_PRESETS[preset.replace("-in-", "-mix-")]


# --------------------------------------------------------------------------- errors


def _bare_file(tmp_path, sana_model, edit) -> Path:
    _, ours = sana_model
    state = dict(state_in_layout(ours, "original"))
    edit(state)
    path = tmp_path / "edited.safetensors"
    write_safetensors(path, state)
    return path


def test_checkpoint_errors(tmp_path, sana_model):
    _, ours = sana_model
    with pytest.raises(SanaCheckpointError, match="no such file"):
        load_dcae(tmp_path / "absent.safetensors")
    (tmp_path / "noise.bin2").write_bytes(b"\x93NUMPY garbage that is no checkpoint")
    with pytest.raises(SanaCheckpointError, match="unknown checkpoint format"):
        load_dcae(tmp_path / "noise.bin2")
    save_dcae(ours, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(SanaCheckpointError, match="truncated"):
        load_dcae(tmp_path / "cut.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(SanaCheckpointError, match="corrupt"):
        load_dcae(tmp_path / "corrupt.safetensors")
    write_safetensors(tmp_path / "dit.safetensors", {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(SanaCheckpointError, match="unknown layout"):
        load_dcae(tmp_path / "dit.safetensors")

    missing = "decoder.stages.2.op_list.1.main.conv1.conv.bias"
    path = _bare_file(tmp_path, sana_model, lambda s: s.pop(missing))
    with pytest.raises(SanaCheckpointError, match=rf"missing keys \(1\): \['{missing}'\]"):
        load_dcae(path, config=ours.config)
    with pytest.raises(SanaCheckpointError, match=rf"missing keys \(1\): \['{missing}'\]"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcae(path)  # detected from the keys, then checked
    path = _bare_file(tmp_path, sana_model, lambda s: s.update({"encoder.stages.0.op_list.0.main.extra": torch.ones(2)}))
    with pytest.raises(SanaCheckpointError, match=r"unexpected keys \(1\): \['encoder.stages.0.op_list.0.main.extra'\]"):
        load_dcae(path, config=ours.config)
    wrong = "encoder.stages.1.op_list.0.main.conv2.conv.weight"
    path = _bare_file(tmp_path, sana_model, lambda s: s.update({wrong: torch.zeros(16, 16, 1, 1)}))
    for config in (ours.config, None):
        with pytest.raises(SanaCheckpointError, match=rf"{wrong}: expected \[16, 16, 3, 3\], found \[16, 16, 1, 1\]"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_dcae(path, config=config)
    with pytest.raises(SanaInputError, match="unknown DC-AE preset"):
        load_dcae(tmp_path / "good.safetensors", config="dc-ae-f16")


def test_damaged_release_is_reported_against_the_release():
    shapes = file_shapes(DCAE_PRESETS["dc-ae-f32c32-sana-1.0"], "original")
    gone = "decoder.stages.5.op_list.2.local_module.main.point_conv.norm.bias"
    del shapes[gone]
    shapes["decoder.stages.5.op_list.2.local_module.main.point_conv.conv.weight"] = (1024, 4096, 3, 3)
    reader = _fake_reader("/m/model.safetensors", shapes)
    with pytest.raises(SanaCheckpointError, match=rf"missing keys \(1\): \['{gone}'\].*expected \[1024, 4096, 1, 1\], "
                                                  r"found \[1024, 4096, 3, 3\]"):
        validate_checkpoint(reader)


def test_feature_maps_stay_channels_last_through_every_block(sana_model):
    """The decoder runs channels-last; one block handing on an NCHW map (the attention's output
    normed onto the residual, say) makes every later conv reorder its input, which cost 1.4x
    the time and 1.4x the activation memory of a 4096² decode when it happened."""
    from sana.dcae import EfficientViTBlock, ResBlock

    _, ours = sana_model
    layouts = []

    def record(module, inputs, output):
        layouts.append((type(module).__name__, output.is_contiguous(memory_format=torch.channels_last)))

    handles = [m.register_forward_hook(record) for m in ours.decoder.modules() if isinstance(m, (ResBlock, EfficientViTBlock, UpBlock))]
    try:
        with torch.no_grad():
            ours.decode(torch.randn(1, ours.latent_channels, 3, 5), memory_budget=1 << 40)
    finally:
        for handle in handles:
            handle.remove()
    assert {name for name, _ in layouts} == {"ResBlock", "EfficientViTBlock", "UpBlock"}
    assert all(channels_last for _, channels_last in layouts), layouts
