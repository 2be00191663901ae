"""The W8A8 Triton kernels against their PyTorch references (sana/quant/ops.py).

On a CPU-only machine they run under Triton's interpreter (TRITON_INTERPRET=1, set here before
the kernels are defined); with a CUDA GPU they run compiled. Shapes are tiny and odd so that
every masked edge is exercised; outputs are poisoned (NaN floats, int8 -128, which the quantizer
never emits) inside larger buffers, so a missed element or a write outside the view shows.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton's interpreter only works when TRITON_INTERPRET=1 is set before triton is first imported
# (an earlier test module importing diffusers imports it): then the kernels cannot run here.
_LATE_INTERPRETER = "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
pytest.importorskip("triton")
if _LATE_INTERPRETER:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1 in the environment",
                allow_module_level=True)

from sana.ops import use_kernels  # noqa: E402
from sana.quant import ops, quantize_w8a8  # noqa: E402
from sana.quant import triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_ops.INTERPRETING:
    pytest.skip("triton kernels were defined without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)

POISON_INT8 = -128


def poisoned_int8(rows: int, cols: int, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A view `[rows, cols]` into a buffer with `pad` extra poisoned columns, and the buffer."""
    buffer = torch.full((rows, cols + pad), POISON_INT8, dtype=torch.int8, device=DEVICE)
    return buffer[:, :cols], buffer


def poisoned_scales(rows: int) -> torch.Tensor:
    return torch.full((rows,), float("nan"), device=DEVICE)


def assert_quantized_equal(got, want, what: str) -> None:
    """Kernel vs reference int8 with the dispatcher's probe tolerance: equal, except one step
    where a division lands on .5 within float error; scales within 1e-6."""
    values, scales = got
    assert (values != POISON_INT8).all(), f"{what}: unwritten values"
    assert torch.isfinite(scales).all(), f"{what}: unwritten scales"
    problem = ops.QUANTIZED_TOLERANCE.mismatch(got, want, None)
    assert problem is None, f"{what}: {problem}"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


# --------------------------------------------------------------------------------------------
# int8 GEMM with the fused epilogue


@pytest.mark.parametrize("M, K, N", [(37, 53, 29), (1, 7, 3), (70, 130, 45)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_int8_gemm_matches_the_reference_in_fp32(M, K, N, has_bias):
    g = generator(M)
    a = torch.randint(-127, 128, (M, K), generator=g, device=DEVICE, dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), generator=g, device=DEVICE, dtype=torch.int8)
    a_s, w_s = torch.rand(M, generator=g, device=DEVICE) + 0.1, torch.rand(N, generator=g, device=DEVICE) + 0.1
    bias = torch.randn(N, generator=g, device=DEVICE) if has_bias else None
    buffer = torch.full((M, N + 5), float("nan"), device=DEVICE)
    out = triton_ops.int8_linear(a, a_s, w, w_s, bias, torch.float32, out=buffer[:, :N])
    assert out.data_ptr() == buffer.data_ptr()
    want = ops.int8_linear_reference(a, a_s, w, w_s, bias, torch.float32)
    assert ops.INT8_LINEAR_TOLERANCE.mismatch(out, want, None) is None  # the probes' tolerance
    if DEVICE == "cpu":  # the interpreter runs the epilogue op by op, as the reference: no fused multiply-add
        assert torch.equal(out, want)
    assert torch.isnan(buffer[:, N:]).all()  # nothing written beyond the view


def test_int8_gemm_accumulates_in_exact_int32():
    K = 2000  # 2000 · 127² > 2^24: an fp32 accumulator would round
    a = torch.full((17, K), 127, dtype=torch.int8, device=DEVICE)
    w = torch.full((19, K), -127, dtype=torch.int8, device=DEVICE)
    a[1, ::2] = -127
    ones_m, ones_n = torch.ones(17, device=DEVICE), torch.ones(19, device=DEVICE)
    out = triton_ops.int8_linear(a, ones_m, w, ones_n, None, torch.float64 if DEVICE == "cpu" else torch.float32)
    exact = (a.long() @ w.long().t()).to(out.dtype)
    assert torch.equal(out, exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_gemm_half_outputs_and_strided_activations(dtype):
    g = generator(3)
    rows = torch.randint(-127, 128, (23, 64), generator=g, device=DEVICE, dtype=torch.int8)
    a = rows[:, :41]  # row stride 64, K = 41
    w = torch.randint(-127, 128, (18, 41), generator=g, device=DEVICE, dtype=torch.int8)
    a_s, w_s = torch.rand(23, generator=g, device=DEVICE) * 1e-3, torch.rand(18, generator=g, device=DEVICE) * 1e-3
    bias = torch.randn(18, generator=g, device=DEVICE).to(dtype)
    got = triton_ops.int8_linear(a, a_s, w, w_s, bias, dtype)
    want = ops.int8_linear_reference(a, a_s, w, w_s, bias, dtype)
    assert got.dtype == dtype
    # The same fp32 value, cast once: the cast may round the other way (one ulp of the dtype).
    problem = ops.INT8_LINEAR_TOLERANCE.mismatch(got, want, None)
    assert problem is None, problem


# --------------------------------------------------------------------------------------------
# Fused quantizers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_quantizer_matches_the_reference(dtype):
    g = generator(1)
    x = (torch.randn(19, 64 + 45, generator=g, device=DEVICE) * 3).to(dtype)[:, :45]  # strided rows, K = 45
    x[4] = 0  # an all-zero row
    values, buffer = poisoned_int8(19, 45)
    got = triton_ops.quantize_rows(x, out=(values, poisoned_scales(19)))
    assert_quantized_equal(got, ops.quantize_rows_reference(x), "quantize_rows")
    assert (buffer[:, 45:] == POISON_INT8).all()
    assert (got[0][4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv_glu_quantizer_matches_the_reference(dtype, bias):
    """The Mix-FFN middle from the inverted conv's output: odd image sides, H not a block multiple,
    a strided (sliced) input, poisoned outputs."""
    g = generator(2)
    B, H, h, w = 2, 37, 3, 5
    y = (torch.randn(B, h * w, 2 * H + 6, generator=g, device=DEVICE) * 2).to(dtype)[..., : 2 * H]
    weight = (torch.randn(2 * H, 1, 3, 3, generator=g, device=DEVICE) / 3).to(dtype)
    b = torch.randn(2 * H, generator=g, device=DEVICE).to(dtype) if bias else None
    values, buffer = poisoned_int8(B * h * w, H)
    got_values, got_scales = triton_ops.depthwise_conv_glu_quantize(y, weight, b, h, w, out=(values, poisoned_scales(B * h * w)))
    want_values, want_scales = ops.depthwise_conv_glu_quantize_reference(y, weight, b, h, w)
    assert got_values.shape == (B, h * w, H) and got_scales.shape == (B, h * w)
    assert_quantized_equal((got_values.reshape(-1, H), got_scales.reshape(-1)),
                           (want_values.reshape(-1, H), want_scales.reshape(-1)), "depthwise_conv_glu_quantize")
    assert (buffer[:, H:] == POISON_INT8).all()


@pytest.mark.parametrize("C", [24, 45])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_modulate_quantizer_matches_the_reference(C, dtype):
    g = generator(C)
    B, N = 2, 7
    x = (torch.randn(B, N, C, generator=g, device=DEVICE) * 2 + 0.5).to(dtype)
    t_mod = torch.randn(B, 6, C, generator=g, device=DEVICE).to(dtype)
    shift, scale = t_mod.chunk(6, dim=1)[3:5]  # [B, 1, C] views with batch stride 6C, as the block has them
    values = torch.full((B * N, C), POISON_INT8, dtype=torch.int8, device=DEVICE)
    got = triton_ops.layernorm_modulate_quantize(x, shift, scale, 1e-6, out=(values, poisoned_scales(B * N)))
    want = ops.layernorm_modulate_quantize_reference(x, shift, scale, 1e-6)
    assert got[0].shape == (B, N, C) and got[1].shape == (B, N)
    assert_quantized_equal(got, want, "layernorm_modulate_quantize")


def test_rows_wider_than_the_kernel_limit_are_refused():
    with pytest.raises(ValueError, match="limit"):
        triton_ops.quantize_rows(torch.zeros(1, triton_ops.MAX_ROW + 1, device=DEVICE))


def test_depthwise_conv_glu_quantizer_names_inputs_that_do_not_fit():
    y, weight = torch.zeros(1, 15, 8, device=DEVICE), torch.zeros(8, 1, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[1, 15, 8\] is not \[B, 4·4, 2H\]"):  # 15 tokens for a 4×4 map
        triton_ops.depthwise_conv_glu_quantize(y, weight, None, 4, 4)
    with pytest.raises(ValueError, match=r"weight \[6, 1, 3, 3\] does not fit 8 channels"):
        triton_ops.depthwise_conv_glu_quantize(y, weight[:6], None, 3, 5)


# --------------------------------------------------------------------------------------------
# The whole route


def test_quantized_dit_gives_the_same_velocity_on_both_routes():
    import sana

    cfg = sana.SanaDiTConfig(hidden_size=32, depth=1, attention_head_dim=16, cross_attention_heads=2,
                             cross_attention_head_dim=16, caption_channels=12, in_channels=4, out_channels=4, sample_size=4)
    torch.manual_seed(0)
    model = quantize_w8a8(sana.SanaDiT(cfg).eval().to(DEVICE))
    g = generator(5)
    x = torch.randn(2, 4, 3, 5, generator=g, device=DEVICE)
    context, mask = torch.randn(2, 6, 12, generator=g, device=DEVICE), torch.ones(2, 6, device=DEVICE)
    t = torch.tensor([900.0, 100.0], device=DEVICE)
    outputs = {}
    for route in ("torch", "triton"):
        with use_kernels(route), torch.no_grad():
            outputs[route] = model(x, t, context, mask)
    assert ((outputs["triton"] - outputs["torch"]).norm() / outputs["torch"].norm()) < 1e-5
