"""W8A8 int8 quantization of the SANA DiT (SANA paper §4): int8 weights per output channel,
int8 activations per token, Triton int8 GEMMs with fused dequantization on CUDA.

- `quantize_w8a8(model, *, keep=..., weight_only=..., inplace=False)`: the quantized DiT.
- `save_w8a8(model, path)`: a safetensors checkpoint with int8 weights and scales, which
  `sana.load_dit` (or `sana.load_w8a8`, for W8A8 files only) reads back.
- `W8A8Linear`, `QuantizedActivation` and the ops in `sana.quant.ops` (PyTorch references and
  routing; `SANA_KERNELS=auto|triton|torch`), kernels in `sana.quant.triton_ops`.
"""

from .checkpoint import W8A8_METADATA_KEY, save_w8a8
from .model import DEFAULT_KEEP, DEFAULT_WEIGHT_ONLY, W8A8Linear, block_weight_bytes, is_w8a8, quantize_w8a8
from .ops import QuantizedActivation

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_WEIGHT_ONLY",
    "QuantizedActivation",
    "W8A8Linear",
    "W8A8_METADATA_KEY",
    "block_weight_bytes",
    "is_w8a8",
    "quantize_w8a8",
    "save_w8a8",
]
