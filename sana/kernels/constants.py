"""Numbers the kernels and the models' PyTorch references share (no triton, no model imports).

The models import them from here, so that a kernel never reaches into a model file for them.
"""

from __future__ import annotations

# Added to the linear-attention denominator (the DiT's and the DC-AE's): keeps an all-ReLU-zero
# query row finite.
LINEAR_ATTENTION_EPS = 1e-15

# W8A8 (sana.quant): symmetric int8 without -128, so negating a quantized tensor stays exact.
INT8_MAX = 127
# Smallest row maximum used for a scale: an all-zero row quantizes to zeros instead of NaN.
MIN_ABSMAX = 1e-8
