"""Triton kernels (`sana.kernels`) against their PyTorch references, and the dispatcher (`sana.ops.fused`).

Without a GPU the kernels run in Triton's CPU interpreter (set up below, before any kernel
module is imported), on small odd shapes; with one they run compiled, and the `full_size`
cases add the released shapes. Every check draws fresh random inputs, runs with the kernels'
outputs and workspaces poisoned with NaN (an unwritten element fails), and measures
‖out − oracle‖ / ‖oracle‖ against the reference evaluated on float64 inputs with the tolerance
the dispatcher's probes use on a user's device (`sana.kernels.RELATIVE_ERROR`): fp32 within
1e-5; 16-bit within 2e-2 and within 1.25× (+1e-3) of the reference's own error in that dtype
(4× under the interpreter, which truncates instead of rounding). The dispatcher itself (probes,
timing, fallbacks) is tested in test_dispatch.py.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel module is imported
pytest.importorskip("triton")

from sana import dcae, dit, kernels, ops  # noqa: E402
from sana.kernels import dispatch, launch  # noqa: E402
from sana.kernels.tolerance import FP32_TOL, rel_err  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
full_size = pytest.mark.skipif(DEVICE.type != "cuda", reason="full-size shapes need a GPU")

_seed = [0]


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Fresh random values for every call (a new seed each time, reproducible run to run)."""
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def f64(*tensors):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def check(out, reference_out, oracle, dtype):
    """out: Triton; reference_out: the reference in the same dtype (None: fp32 only); oracle: the
    reference in float64. The probes' tolerance, which also fails on NaN (an unwritten element)."""
    assert out.dtype == dtype
    problem = kernels.RELATIVE_ERROR.mismatch(out, reference_out, oracle)
    assert problem is None, problem


@pytest.fixture(autouse=True)
def poisoned():
    with launch.poisoned_outputs(), torch.no_grad():
        yield


DTYPES = [torch.float32, torch.bfloat16]

# --------------------------------------------------------------------------------------------
# DiT linear attention


def qkv_chunks(B, N, C, dtype):
    """q, k, v as the DiT makes them: strided chunks of one fused projection output."""
    return randn(B, N, 3 * C, dtype=dtype).chunk(3, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, N, heads, D", [(2, 37, 3, 32), (1, 5, 2, 16)])
def test_relu_linear_attention_forward(B, N, heads, D, dtype):
    q, k, v = qkv_chunks(B, N, heads * D, dtype)
    out = kernels.relu_linear_attention(q, k, v, heads)
    assert out.dtype == dtype and out.shape == (B, N, heads * D)
    ref = dit.relu_linear_attention.reference
    check(out, ref(q, k, v, heads), ref(*f64(q, k, v), heads), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_linear_attention_backward(dtype):
    B, N, heads, D = 2, 37, 3, 32
    base = randn(B, N, 3 * heads * D, dtype=dtype)
    grad = randn(B, N, heads * D, dtype=dtype)

    def grads(fn, x):
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            fn(*x.chunk(3, dim=-1), heads).backward(grad.to(x.dtype))
        return x.grad

    ref = dit.relu_linear_attention.reference
    check(grads(kernels.relu_linear_attention, base), grads(ref, base), grads(ref, base.double()), dtype)


@full_size
@pytest.mark.parametrize("B, N, heads", [(1, 16384, 70), (16, 1024, 36)])
def test_relu_linear_attention_full_size(B, N, heads):
    q, k, v = qkv_chunks(B, N, heads * 32, torch.bfloat16)
    ref = dit.relu_linear_attention.reference
    check(kernels.relu_linear_attention(q, k, v, heads), ref(q, k, v, heads), ref(*f64(q, k, v), heads), torch.bfloat16)


# --------------------------------------------------------------------------------------------
# DC-AE multi-scale linear attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("height, width", [(5, 7), (3, 4)])  # 3×4 ≤ head_dim: the reference's N×N branch
def test_relu_linear_attention_multiscale_forward(height, width, channels_last, dtype):
    head_dim, groups = 32, 3
    qkv = randn(2, groups * 3 * head_dim, height, width, dtype=dtype)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    out = kernels.relu_linear_attention_multiscale(qkv, head_dim)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref = dcae.relu_linear_attention_multiscale.reference
    check(out, ref(qkv, head_dim), ref(qkv.double(), head_dim), dtype)


def test_relu_linear_attention_multiscale_backward():
    head_dim = 32
    qkv = randn(2, 2 * 3 * head_dim, 5, 7).contiguous(memory_format=torch.channels_last)
    grad = randn(2, 2 * head_dim, 5, 7)

    def grads(fn, x):
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            fn(x, head_dim).backward(grad.to(x.dtype))
        return x.grad

    ref = dcae.relu_linear_attention_multiscale.reference
    check(grads(kernels.relu_linear_attention_multiscale, qkv), None, grads(ref, qkv.double()), torch.float32)


# --------------------------------------------------------------------------------------------
# Norms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm(dtype, strided):
    C = 96
    x = randn(2, 37, 3 * C, dtype=dtype)[..., C : 2 * C] if strided else randn(2, 37, C, dtype=dtype)
    weight = randn(C, dtype=dtype, scale=0.5) + 1
    out = kernels.rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype
    check(out, dit.rms_norm.reference(x, weight, 1e-5), dit.rms_norm.reference(*f64(x, weight), 1e-5), dtype)


def test_rms_norm_fp32_weight_on_bf16_input_returns_fp32():
    x, weight = randn(3, 11, 40, dtype=torch.bfloat16), randn(40)
    out = kernels.rms_norm(x, weight, 1e-6)
    ref = dit.rms_norm.reference(x, weight, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    check(out, ref, dit.rms_norm.reference(*f64(x, weight), 1e-6), torch.float32)


def modulation(B, C, dtype):
    """shift, scale, gate … as the block makes them: [B, 1, C] chunks of a [B, 6, C] table."""
    return (randn(6, C, dtype=dtype, scale=0.3)[None] + randn(B, 6, C, dtype=dtype, scale=0.3)).chunk(6, dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_modulate(dtype):
    B, N, C = 2, 37, 96
    x = randn(B, N, C, dtype=dtype, scale=3) + 1
    shift, scale = modulation(B, C, dtype)[:2]
    out = kernels.layer_norm_modulate(x, shift, scale, 1e-6)
    ref = dit.layer_norm_modulate.reference
    check(out, ref(x, shift, scale, 1e-6), ref(*f64(x, shift, scale), 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_layer_norm_modulate(dtype):
    B, N, C = 2, 37, 96
    x, update = randn(B, N, C, dtype=dtype), randn(B, N, C, dtype=dtype)
    shift, scale = modulation(B, C, dtype)[3:5]
    ref = dit.residual_layer_norm_modulate.reference
    x_ref, y_ref = ref(x.clone(), update, shift, scale, 1e-6)
    x_oracle, y_oracle = ref(*f64(x, update, shift, scale), 1e-6)
    x_in = x.clone()
    x_out, y = kernels.residual_layer_norm_modulate(x_in, update, shift, scale, 1e-6)
    assert x_out is x_in  # no autograd: updated in place, as the reference does
    check(x_out, x_ref, x_oracle, dtype)
    check(y, y_ref, y_oracle, dtype)
    with torch.enable_grad():  # autograd on: x is left alone
        x_in = x.clone()
        x_out, _ = kernels.residual_layer_norm_modulate(x_in, update, shift, scale, 1e-6)
    assert x_out is not x_in and torch.equal(x_in, x)


@full_size
def test_norms_full_size():
    x = randn(1, 16384, 2240, dtype=torch.bfloat16)
    shift, scale = modulation(1, 2240, torch.bfloat16)[:2]
    ref = dit.layer_norm_modulate.reference
    check(kernels.layer_norm_modulate(x, shift, scale, 1e-6), ref(x, shift, scale, 1e-6),
          ref(*f64(x, shift, scale), 1e-6), torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Mix-FFN depthwise conv + GLU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_silu", [False, True])
def test_depthwise_conv_glu(dtype, bias, input_silu):
    B, height, width, hidden = 2, 5, 7, 40
    y = randn(B, height * width, 2 * hidden, dtype=dtype)
    weight = randn(2 * hidden, 1, 3, 3, dtype=dtype, scale=1 / 3)
    b = randn(2 * hidden, dtype=dtype) if bias else None
    out = kernels.depthwise_conv_glu(y, weight, b, height, width, input_silu)
    ref = dit.depthwise_conv_glu.reference
    check(out, ref(y.clone(), weight, b, height, width, input_silu),
          ref(*f64(y, weight, b), height, width, input_silu), dtype)


def test_depthwise_conv_glu_input_silu_is_the_inverted_convs_activation():
    # The fused SiLU must equal applying it beforehand, border pixels included (padding after SiLU).
    y = randn(1, 3 * 4, 2 * 8, dtype=torch.float32, scale=3.0)
    weight, b = randn(16, 1, 3, 3, dtype=torch.float32), randn(16, dtype=torch.float32)
    fused_silu = kernels.depthwise_conv_glu(y, weight, b, 3, 4, True)
    silu_first = kernels.depthwise_conv_glu(torch.nn.functional.silu(y), weight, b, 3, 4)
    torch.testing.assert_close(fused_silu, silu_first, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fused_silu, kernels.depthwise_conv_glu(y, weight, b, 3, 4), atol=1e-2)


@full_size
def test_depthwise_conv_glu_full_size():
    y = randn(1, 128 * 128, 2 * 5600, dtype=torch.bfloat16)
    weight, b = randn(11200, 1, 3, 3, dtype=torch.bfloat16, scale=1 / 3), randn(11200, dtype=torch.bfloat16)
    ref = dit.depthwise_conv_glu.reference
    check(kernels.depthwise_conv_glu(y, weight, b, 128, 128, True), ref(y.clone(), weight, b, 128, 128, True),
          ref(*f64(y, weight, b), 128, 128, True), torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Dispatcher and the whole DiT


def counting(name: str, calls: list, result=None):
    """Kernel `name` replaced, within a `dispatch.isolated()` block, by one that records its calls
    and returns `result` (default: the real kernel's output)."""
    real = dispatch.spec(name)

    def load():
        kernel = real.load() if result is None else None
        return lambda *a, **k: calls.append(name) or (kernel(*a, **k) if kernel else result)

    dispatch.register(dataclasses.replace(real, load=load))


def test_dispatch_routes_by_backend_and_autograd():
    calls = []
    x, w = randn(2, 3, 8), randn(8)
    expected = dit.rms_norm.reference(x, w, 1e-6)
    with dispatch.isolated():
        counting("rms_norm", calls, result=NotImplemented)
        # auto: never on the CPU; on a GPU the kernel's probe sees NotImplemented (declined).
        for backend, routed in (("torch", False), ("triton", True), ("auto", DEVICE.type == "cuda")):
            calls.clear()
            with ops.use_kernels(backend):
                torch.testing.assert_close(dit.rms_norm(x, w, 1e-6), expected)  # NotImplemented → reference
            assert calls == (["rms_norm"] if routed else []), backend
        calls.clear()
        with ops.use_kernels("triton"), torch.enable_grad():  # forward-only kernel, gradients wanted
            dit.rms_norm(x, w.requires_grad_(True), 1e-6)
        assert calls == []
    with pytest.raises(ValueError):
        with ops.use_kernels("cuda"):
            pass


def tiny_dit(dtype: torch.dtype, qk_norm: bool) -> dit.SanaDiT:
    config = dit.SanaDiTConfig(hidden_size=64, depth=1, cross_attention_heads=2, cross_attention_head_dim=32,
                               caption_channels=24, in_channels=8, out_channels=8, qk_norm=qk_norm)
    torch.manual_seed(0)
    model = dit.SanaDiT(config)
    with torch.no_grad():  # spread the tiny adaLN tables so every modulate matters
        for name, p in model.named_parameters():
            if "scale_shift_table" in name:
                p.normal_(0, 0.3)
    return model.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype, qk_norm", [(torch.float32, True), (torch.bfloat16, False)])
def test_dit_forward_with_triton_kernels(dtype, qk_norm):
    model = tiny_dit(dtype, qk_norm)
    x, context = randn(2, 8, 5, 7, dtype=dtype), randn(2, 9, 24, dtype=dtype)
    mask = torch.ones(2, 9, device=DEVICE)
    mask[0, 6:] = 0
    t = torch.tensor([999.0, 20.0], device=DEVICE)
    with ops.use_kernels("torch"):
        expected = model(x, t, context, mask)
    with ops.use_kernels("triton"):
        got = model(x, t, context, mask)
    oracle = tiny_dit(torch.float64, qk_norm)
    with ops.use_kernels("torch"):
        oracle_out = oracle(*f64(x, t, context), mask)
    check(got, expected, oracle_out, dtype)


def test_dit_training_step_with_triton_attention():
    """Gradients through the Triton attention backward (the norms fall back to the reference)."""
    grads = {}
    for backend in ("torch", "triton"):
        model = tiny_dit(torch.float32, qk_norm=True)
        _seed[0] = 1000  # same inputs for both backends
        x, context = randn(2, 8, 5, 7), randn(2, 9, 24)
        with ops.use_kernels(backend), torch.enable_grad():
            model(x, torch.tensor([500.0, 30.0], device=DEVICE), context).square().mean().backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel_err(grads["triton"], grads["torch"]) < FP32_TOL


def test_dcae_decode_with_triton_kernels():
    """The DC-AE's multi-scale attention and RMSNorm2d (+ residual) route through the dispatcher."""
    from sana.dcae import DCAE, DCAE_PRESETS

    widths, depths = (8, 16, 32), (1, 1, 1)
    config = dataclasses.replace(
        DCAE_PRESETS["dc-ae-f32c32-sana-1.0"], latent_channels=4, attention_head_dim=4,
        encoder_widths=widths, decoder_widths=widths, encoder_depths=depths, decoder_depths=depths,
        encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_qkv_multiscales=((), (5,), (5,)), decoder_qkv_multiscales=((), (5,), (5,)),
        decoder_norm_types=("rms_norm",) * 3, decoder_act_fns=("silu",) * 3,
    )
    torch.manual_seed(0)
    model = DCAE(config).to(DEVICE).eval()
    latents = randn(1, 4, 3, 5)  # 3×5 latent: the deepest maps have fewer pixels than a head is wide
    calls = []
    with ops.use_kernels("torch"):
        expected = model.decode(latents)
    with ops.use_kernels("triton"), dispatch.isolated():
        for name in ("relu_linear_attention_multiscale", "rms_norm_2d"):
            counting(name, calls)
        got = model.decode(latents)
    assert calls.count("relu_linear_attention_multiscale") == 2  # one per EfficientViT block of the decoder
    # Every block's norms (a ResBlock: 1; an EfficientViT block: 2) and the output norm.
    assert calls.count("rms_norm_2d") == 1 + 2 * 2 + 1
    assert rel_err(got, expected) < FP32_TOL


# --------------------------------------------------------------------------------------------
# DC-AE RMSNorm2d (+ residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual_layout", [None, "same", "other"])
def test_rms_norm_2d(dtype, channels_last, residual_layout):
    B, C, H, W = 2, 37, 5, 3  # channels and pixels not multiples of the blocks
    formats = [torch.contiguous_format, torch.channels_last]
    x = randn(B, C, H, W, dtype=dtype, scale=2.0).contiguous(memory_format=formats[channels_last])
    weight, bias = randn(C, dtype=dtype, scale=0.5) + 1, randn(C, dtype=dtype, scale=0.5)
    residual = None
    if residual_layout is not None:  # "other": the attention's NCHW output normed onto a channels-last input, say
        residual_format = formats[channels_last != (residual_layout == "other")]
        residual = randn(B, C, H, W, dtype=dtype).contiguous(memory_format=residual_format)
    out = kernels.rms_norm_2d(x, weight, bias, 1e-5, residual)
    ref = dcae.rms_norm_2d.reference
    expected = ref(x, weight, bias, 1e-5, residual)
    assert out.stride() == expected.stride()  # the layout the reference gives: the residual's, else x's
    assert out.stride() == (residual if residual is not None else x).stride()
    check(out, expected, ref(*f64(x, weight, bias), 1e-5, *f64(residual)), dtype)


def test_rms_norm_2d_declines_what_it_does_not_take():
    x, weight = randn(1, 4, 2, 2), randn(4)
    assert kernels.rms_norm_2d(x, weight, randn(3), 1e-5) is NotImplemented  # bias of the wrong size
    cropped = randn(1, 4, 2, 3)[..., :2]  # rows 3 apart, pixels 1 apart: no single pixel stride
    assert kernels.rms_norm_2d(cropped, weight, randn(4), 1e-5) is NotImplemented
    ref = dcae.rms_norm_2d.reference
    with ops.use_kernels("triton"):  # declined inputs take the reference through the dispatcher
        torch.testing.assert_close(dcae.rms_norm_2d(cropped, weight, bias := randn(4), 1e-5),
                                   ref(cropped, weight, bias, 1e-5))
