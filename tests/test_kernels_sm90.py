"""Every Triton kernel compiles for Hopper (sm_90) through Triton's front end, LLVM and ptxas.

Needs no GPU (the interpreter tests in test_kernels.py do not compile anything), so CI catches
type and layout errors in the compiled path; the bf16 variants are the ones the models run.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():  # as test_kernels.py: whichever is imported first decides for both
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from sana.kernels import linear_attention, mix_ffn, norms  # noqa: E402

BF16, F32 = "*bf16", "*fp32"
KERNELS = [
    (linear_attention._kv_kernel, dict(K=BF16, V=BF16, KV_PART=F32, KSUM_PART=F32),
     dict(BLOCK_N=64, BLOCK_D=32, DOT_PRECISION="tf32", UPCAST_DOT=False), 4),
    (linear_attention._attend_kernel, dict(Q=BF16, KV=F32, KSUM=F32, OUT=BF16, eps="fp32"), dict(BLOCK_N=64, BLOCK_D=32), 4),
    (linear_attention._grad_q_kernel, dict(Q=BF16, G=BF16, KV=F32, KSUM=F32, DQ=BF16, DKV_PART=F32, DKSUM_PART=F32,
                                           eps="fp32"), dict(BLOCK_N=64, BLOCK_D=32), 4),
    (linear_attention._grad_kv_kernel, dict(K=BF16, V=BF16, DKV=F32, DKSUM=F32, DK=BF16, DV=BF16),
     dict(BLOCK_N=64, BLOCK_D=32), 4),
    (norms._rms_norm_kernel, dict(X=BF16, W=BF16, OUT=BF16, eps="fp32"), dict(BLOCK_C=4096, ROUND_BEFORE_WEIGHT=True), 8),
    (norms._layer_norm_modulate_kernel, dict(X=BF16, UPDATE=BF16, X_OUT=BF16, SHIFT=BF16, SCALE=BF16, Y=BF16, eps="fp32"),
     dict(BLOCK_C=4096, HAS_UPDATE=True), 8),
    (mix_ffn._depthwise_conv_glu_kernel, dict(Y=BF16, W=BF16, BIAS=BF16, OUT=BF16),
     dict(BLOCK_P=32, BLOCK_H=64, HAS_BIAS=True, INPUT_SILU=True), 4),
]


@pytest.mark.parametrize("kernel, pointers, constexprs, num_warps", KERNELS, ids=lambda k: getattr(getattr(k, "fn", None), "__name__", ""))
def test_compiles_for_sm90(kernel, pointers, constexprs, num_warps):
    # A fresh JITFunction of the Python source: the module's own object is an interpreter
    # wrapper when test_kernels.py (collected first) set TRITON_INTERPRET=1.
    jit = JITFunction(kernel.fn)
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    source = ASTSource(jit, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"]
