"""`sana.ops`: every route computes what the plain PyTorch op computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sana.ops import Linear, linear


@pytest.mark.parametrize("rows", [1, 63, 64, 300, 1024])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 48, generator=g)
    w = torch.randn(80, 48, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    expected = F.linear(x, w, b)
    got = linear(x, w, b)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_on_strided_input_and_gradients():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 100, 96, generator=g)
    x = base[..., ::2].clone().requires_grad_(True)  # also check a non-contiguous view below
    layer = Linear(48, 32)
    reference = torch.nn.Linear(48, 32)
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(base[..., ::2]), reference(base[..., ::2]), rtol=1e-5, atol=1e-5)
    layer(x).square().sum().backward()
    grad_ours = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    x.grad = None
    reference(x).square().sum().backward()
    for a, b in zip(grad_ours, (x.grad, reference.weight.grad, reference.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_linear_keeps_other_dtypes_on_the_plain_route():
    x = torch.randn(1, 128, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    assert torch.equal(linear(x, w), F.linear(x, w))
