"""Every Triton kernel compiles for Hopper (sm_90) through Triton's front end, LLVM and ptxas.

Needs no GPU (the interpreter tests in test_kernels.py do not compile anything), so CI catches
type and layout errors in the compiled path; the bf16 variants are the ones the models run.

The compiling happens in a child Python without TRITON_INTERPRET. In this process the test
session has set it, and then triton.language's own jit helpers (`tl.sum`, `tl.sigmoid`, ...)
may be interpreter objects, which the compiler trips over depending on import order.
Run this file as a script to compile everything and print the outcome per kernel as JSON.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BF16, F32, I8 = "*bf16", "*fp32", "*i8"

# name → (module, kernel attribute, pointer dtypes (others are i32), constexprs, num_warps)
KERNELS = {
    "kv": ("sana.kernels.linear_attention", "_kv_kernel", dict(K=BF16, V=BF16, KV_PART=F32, KSUM_PART=F32),
           dict(BLOCK_N=64, BLOCK_D=32, DOT_PRECISION="tf32", UPCAST_DOT=False), 4),
    "attend": ("sana.kernels.linear_attention", "_attend_kernel", dict(Q=BF16, KV=F32, KSUM=F32, OUT=BF16, eps="fp32"),
               dict(BLOCK_N=64, BLOCK_D=32), 4),
    "grad_q": ("sana.kernels.linear_attention", "_grad_q_kernel",
               dict(Q=BF16, G=BF16, KV=F32, KSUM=F32, DQ=BF16, DKV_PART=F32, DKSUM_PART=F32, eps="fp32"),
               dict(BLOCK_N=64, BLOCK_D=32), 4),
    "grad_kv": ("sana.kernels.linear_attention", "_grad_kv_kernel",
                dict(K=BF16, V=BF16, DKV=F32, DKSUM=F32, DK=BF16, DV=BF16), dict(BLOCK_N=64, BLOCK_D=32), 4),
    "rms_norm": ("sana.kernels.norms", "_rms_norm_kernel", dict(X=BF16, W=BF16, OUT=BF16, eps="fp32"),
                 dict(BLOCK_C=4096, ROUND_BEFORE_WEIGHT=True), 8),
    "layer_norm_modulate": ("sana.kernels.norms", "_layer_norm_modulate_kernel",
                            dict(X=BF16, UPDATE=BF16, X_OUT=BF16, SHIFT=BF16, SCALE=BF16, Y=BF16, eps="fp32"),
                            dict(BLOCK_C=4096, HAS_UPDATE=True), 8),
    "rms_norm_2d": ("sana.kernels.norms", "_rms_norm_2d_kernel",
                    dict(X=BF16, W=BF16, BIAS=BF16, RES=BF16, OUT=BF16, eps="fp32"),
                    dict(BLOCK_P=64, BLOCK_C=32, HAS_RESIDUAL=True), 4),
    "depthwise_conv_glu": ("sana.kernels.mix_ffn", "_depthwise_conv_glu_kernel", dict(Y=BF16, W=BF16, BIAS=BF16, OUT=BF16),
                           dict(BLOCK_P=32, BLOCK_H=64, HAS_BIAS=True, INPUT_SILU=True), 4),
    "int8_gemm": ("sana.quant.triton_ops", "_int8_gemm_kernel",
                  dict(a_ptr=I8, a_scale_ptr=F32, w_ptr=I8, w_scale_ptr=F32, bias_ptr=BF16, out_ptr=BF16),
                  dict(HAS_BIAS=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), 8),
    "quantize_rows": ("sana.quant.triton_ops", "_quantize_rows_kernel", dict(x_ptr=BF16, q_ptr=I8, scale_ptr=F32),
                      dict(BLOCK=2048), 8),
    "depthwise_conv_glu_quantize": ("sana.quant.triton_ops", "_depthwise_conv_glu_quantize_kernel",
                                    dict(y_ptr=BF16, w_ptr=BF16, bias_ptr=BF16, q_ptr=I8, scale_ptr=F32),
                                    dict(HAS_BIAS=True, BLOCK_P=32, BLOCK_H=64), 4),
    "layernorm_modulate_quantize": ("sana.quant.triton_ops", "_layernorm_modulate_quantize_kernel",
                                    dict(x_ptr=BF16, shift_ptr=BF16, mod_scale_ptr=BF16, q_ptr=I8, scale_ptr=F32,
                                         eps="fp32"), dict(BLOCK=4096), 8),
}


def compile_all() -> dict[str, str]:
    """Compile every kernel for sm_90; "ok" or the error per name."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (module, attribute, pointers, constexprs, num_warps) in KERNELS.items():
        try:
            kernel = getattr(importlib.import_module(module), attribute)
            names = list(inspect.signature(kernel.fn).parameters)
            signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
            source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
            results[name] = "ok" if compiled.asm.get("cubin") else "no cubin"
        except Exception as error:  # reported per kernel by the test
            results[name] = f"{type(error).__name__}: {error}"[-3000:]
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(KERNELS))
def test_compiles_for_sm90(compiled, name):
    assert compiled[name] == "ok", compiled[name]


if __name__ == "__main__":
    print(json.dumps(compile_all()))
