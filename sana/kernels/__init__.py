"""Triton kernels for SANA, each a drop-in for a PyTorch reference with the same signature.

| Triton (this package)                                  | Reference                                   |
|--------------------------------------------------------|---------------------------------------------|
| `relu_linear_attention` (forward + backward)           | `sana.dit.relu_linear_attention`            |
| `relu_linear_attention_multiscale` (forward + backward)| `sana.dcae.relu_linear_attention_multiscale`|
| `rms_norm_2d` (DC-AE RMSNorm2d + residual add)         | `sana.dcae.rms_norm_2d`                     |
| `rms_norm`                                             | `sana.dit.rms_norm`                         |
| `layer_norm_modulate`                                  | `sana.dit.layer_norm_modulate`              |
| `residual_layer_norm_modulate`                         | `sana.dit.residual_layer_norm_modulate`     |
| `depthwise_conv_glu`                                   | `sana.dit.depthwise_conv_glu`               |

Callers do not import this package: the references are wrapped by `sana.ops.fused`, which
sends CUDA tensors here (or the reference, per `SANA_KERNELS`). A Triton function returns
`NotImplemented` for inputs it does not take (dtype, shape), and the dispatcher then runs the
reference. The kernel modules import triton (and, under `TRITON_INTERPRET=1`, decide at import
to interpret), so they are imported only on the first call that routes here.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "relu_linear_attention": "linear_attention",
    "relu_linear_attention_multiscale": "linear_attention",
    "rms_norm": "norms",
    "rms_norm_2d": "norms",
    "layer_norm_modulate": "norms",
    "residual_layer_norm_modulate": "norms",
    "depthwise_conv_glu": "mix_ffn",
}
# Kernels with a backward: the dispatcher may route calls that need gradients here.
DIFFERENTIABLE = frozenset({"relu_linear_attention", "relu_linear_attention_multiscale"})

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
