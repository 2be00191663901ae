"""Triton kernels for SANA, each a drop-in for a PyTorch reference with the same signature, and
the dispatcher that decides, per device, which of the two runs (`sana.kernels.dispatch`).

| Triton (this package)                                  | Reference                                   |
|--------------------------------------------------------|---------------------------------------------|
| `relu_linear_attention` (forward + backward)           | `sana.dit.relu_linear_attention`            |
| `relu_linear_attention_multiscale` (forward + backward)| `sana.dcae.relu_linear_attention_multiscale`|
| `rms_norm_2d` (DC-AE RMSNorm2d + residual add)         | `sana.dcae.rms_norm_2d`                     |
| `rms_norm`                                             | `sana.dit.rms_norm`                         |
| `layer_norm_modulate`                                  | `sana.dit.layer_norm_modulate`              |
| `residual_layer_norm_modulate`                         | `sana.dit.residual_layer_norm_modulate`     |
| `depthwise_conv_glu`                                   | `sana.dit.depthwise_conv_glu`               |

(The W8A8 kernels live in `sana.quant.triton_ops` and register in `sana.quant.ops`.)

Callers do not import the kernel modules: the models wrap their references with `sana.ops.fused`
(`dispatch.routed`), which sends a call here only when the dispatcher's rules allow (a kernel
that passed its probe on the device and times faster; `SANA_KERNELS` forces either side). A
kernel returns `NotImplemented` for inputs it does not take (dtype, shape), and the reference
then runs. The kernel modules import triton (and, under `TRITON_INTERPRET=1`, decide at import
to interpret), so each is imported at its kernel's first probe or forced call; `sana.kernels.<name>`
imports and returns the kernel itself (tests, benchmarks).

Each kernel's registration below holds its probe inputs (the tests' shapes: small, odd, strided
as the model passes them) and its tolerance (`RELATIVE_ERROR`, which the tests use too).
Nothing here imports a model file: the shared constants live in `constants`.

`report()` returns what the dispatcher decided (see `python -m sana doctor`); `set_cache_dir`
tells it where to keep its timing choices (ComfyUI's user directory, set by `nodes/`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .choice_cache import set_cache_dir
from .constants import LINEAR_ATTENTION_EPS
from .dispatch import KernelSpec, ProbeInputs, register, report
from .tolerance import RelativeError

RELATIVE_ERROR = RelativeError()

# --------------------------------------------------------------------------------------------
# Probe inputs, by parameter name (the reference's)


def _linear_attention_probe(make: ProbeInputs) -> dict[str, Any]:
    B, N, heads, D = 2, 37, 3, 32  # q, k, v: strided chunks of one fused projection output
    q, k, v = make.randn("q", B, N, 3 * heads * D).chunk(3, dim=-1)
    return {"q": q, "k": k, "v": v, "heads": heads}


def _linear_attention_multiscale_probe(make: ProbeInputs) -> dict[str, Any]:
    head_dim, groups = 32, 3
    return {"qkv": make.randn("qkv", 2, groups * 3 * head_dim, 5, 7), "head_dim": head_dim, "eps": LINEAR_ATTENTION_EPS}


def _rms_norm_probe(make: ProbeInputs) -> dict[str, Any]:
    C = 96  # x: the middle third of a wider tensor (the QK norms read Q|K|V chunks)
    return {"x": make.randn("x", 2, 37, 3 * C)[..., C : 2 * C], "weight": make.randn("weight", C, scale=0.5, offset=1.0),
            "eps": 1e-5}


def _modulation(make: ProbeInputs, B: int, C: int) -> dict[str, Any]:
    # [B, 1, C] views of a [B, 6, C] table, as the block makes them.
    return {"shift": make.randn("shift", B, 6, C, scale=0.4)[:, 0:1], "scale": make.randn("scale", B, 6, C, scale=0.4)[:, 1:2]}


def _layer_norm_modulate_probe(make: ProbeInputs) -> dict[str, Any]:
    B, N, C = 2, 37, 96
    return {"x": make.randn("x", B, N, C, scale=3.0, offset=1.0), **_modulation(make, B, C), "eps": 1e-6}


def _residual_layer_norm_modulate_probe(make: ProbeInputs) -> dict[str, Any]:
    B, N, C = 2, 37, 96
    return {"x": make.randn("x", B, N, C), "update": make.randn("update", B, N, C), **_modulation(make, B, C), "eps": 1e-6}


def _depthwise_conv_glu_probe(make: ProbeInputs) -> dict[str, Any]:
    B, height, width, hidden = 2, 5, 7, 40
    return {"y": make.randn("y", B, height * width, 2 * hidden), "weight": make.randn("weight", 2 * hidden, 1, 3, 3, scale=1 / 3),
            "bias": make.randn("bias", 2 * hidden), "height": height, "width": width, "input_silu": True}


def _rms_norm_2d_probe(make: ProbeInputs) -> dict[str, Any]:
    B, C, H, W = 2, 37, 5, 3  # channels and pixels not multiples of the blocks
    return {"x": make.randn("x", B, C, H, W, scale=2.0), "weight": make.randn("weight", C, scale=0.5, offset=1.0),
            "bias": make.randn("bias", C, scale=0.5), "eps": 1e-5, "residual": make.randn("residual", B, C, H, W)}


# name → (module, probe inputs, differentiable, arguments written in place)
_KERNELS: dict[str, tuple[str, Callable[[ProbeInputs], dict[str, Any]], bool, tuple[str, ...]]] = {
    "relu_linear_attention": ("linear_attention", _linear_attention_probe, True, ()),
    "relu_linear_attention_multiscale": ("linear_attention", _linear_attention_multiscale_probe, True, ()),
    "rms_norm": ("norms", _rms_norm_probe, False, ()),
    "rms_norm_2d": ("norms", _rms_norm_2d_probe, False, ()),
    "layer_norm_modulate": ("norms", _layer_norm_modulate_probe, False, ()),
    # Without autograd both update x in place; the reference's Mix-FFN SiLU works in place on y.
    "residual_layer_norm_modulate": ("norms", _residual_layer_norm_modulate_probe, False, ("x",)),
    "depthwise_conv_glu": ("mix_ffn", _depthwise_conv_glu_probe, False, ("y",)),
}


def _loader(module: str, name: str) -> Callable[[], Callable]:
    def load() -> Callable:
        return getattr(importlib.import_module(f".{module}", __name__), name)

    return load


for _name, (_module, _probe, _differentiable, _mutates) in _KERNELS.items():
    register(KernelSpec(name=_name, load=_loader(_module, _name), probe=_probe, tolerance=RELATIVE_ERROR,
                        differentiable=_differentiable, mutates=_mutates))

__all__ = ["RELATIVE_ERROR", "report", "set_cache_dir", *sorted(_KERNELS)]


def __getattr__(name: str) -> Any:
    if name not in _KERNELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _loader(_KERNELS[name][0], name)()
