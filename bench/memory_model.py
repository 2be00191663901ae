"""Peak device memory of a whole `sana.generate` call, modelled on the meta device (no GPU needed).

    python bench/memory_model.py                                  # Sana-1.6B 4K, bf16, CFG: the 16 GB question
    python bench/memory_model.py --dit sana-600m-1024 --size 1024

Every stage runs for real on meta tensors (shapes and dtypes, no data) under a dispatch mode that
counts the bytes of every storage an operation creates and releases them when their last tensor
dies; weights are counted as resident. Per stage, as `generate` runs it on one device:

- encode: the DiT's weights (already on the device) + Gemma-2-2B's weights + its forward on the
  prompt (300 tokens + the CHI) and the negative prompt;
- denoise: the DiT's weights + one CFG step (batch 2 through the DiT, the caption at its full 300
  padded tokens, as no trimming happens on meta) + the sampler's latents;
- decode: the DiT's and the DC-AE's weights + the decode with the tiling `generate` picks when the
  device has `--device-gib` in all (the DC-AE plans its tiles from the free memory).

What a model cannot see, so the measured peak will be higher: the caching allocator's rounding and
fragmentation, cuBLAS/cuDNN workspaces and the CUDA context (about 0.5 GB). What makes it
pessimistic: the fused Triton kernels are not used on meta (their references allocate more), and
PyTorch's attention on meta takes the math route, which materialises the cross-attention scores
(flash/memory-efficient attention on a GPU does not). Compare with `bench/gpu.py` on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import gib  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GEMMA_2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256)
CAPTION_TOKENS = 300
CHI_TOKENS = 250  # the complex human instruction's length in Gemma tokens (about), prepended to the prompt


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode; `peak` is the most alive at once."""

    def __init__(self, resident: list[torch.Tensor]):
        super().__init__()
        self.external = {_storage_key(t) for t in resident}
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key in self.external:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            else:
                nbytes = t.untyped_storage().nbytes()
            self.refs[key] += 1
            weakref.finalize(t, self._release, key, nbytes)
        return out


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def peak_of(fn, resident: list[torch.Tensor]) -> int:
    with torch.no_grad(), LiveBytes(resident) as mode:
        out = fn()
        del out
    return mode.peak


def text_encoder_stage(dtype: torch.dtype) -> tuple[int, int]:
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(**GEMMA_2_2B, attn_implementation="eager")
    with torch.device("meta"):
        gemma = Gemma2Model(config).to(dtype).eval()
    tokens = torch.zeros(1, CAPTION_TOKENS + CHI_TOKENS, dtype=torch.long, device="meta")
    mask = torch.ones_like(tokens)

    def forward():
        return gemma(input_ids=tokens, attention_mask=mask).last_hidden_state

    return weight_bytes(gemma), peak_of(forward, list(gemma.parameters()) + list(gemma.buffers()))


def denoise_stage(preset: str, size: int, dtype: torch.dtype, batch: int) -> tuple[int, int, object]:
    from sana import DIT_PRESETS, SanaDiT
    from sana.samplers import guided_velocity

    config = DIT_PRESETS[preset]
    with torch.device("meta"):
        dit = SanaDiT(config).to(dtype).eval()
    side = size // 32
    x = torch.zeros(batch, config.in_channels, side, side, device="meta")
    context = torch.zeros(2 * batch, CAPTION_TOKENS, config.caption_channels, device="meta", dtype=dtype)
    mask = torch.ones(2 * batch, CAPTION_TOKENS, device="meta")
    velocity = guided_velocity(lambda x_, t_: dit(x_.to(dtype), t_, context, mask, trim_context=False),
                               guidance_scale=4.5)
    t = torch.full((batch,), 999.0, device="meta")

    def step():
        v = velocity(x, t)
        return x - 0.5 * v  # the solver's update: x0 and the next x, float32

    resident = list(dit.parameters()) + list(dit.buffers()) + [x, context, mask, t]
    return weight_bytes(dit), peak_of(step, resident), dit


def decode_stage(size: int, dtype: torch.dtype, free_bytes: int) -> tuple[int, int, tuple]:
    """The decode as `generate` runs it: the DC-AE plans its tiles from 90% of what is free
    (`sana.dcae_tiling.default_memory_budget`) once its own weights are on the device."""
    from sana.dcae import DCAE, DCAE_PRESETS
    from sana.dcae_tiling import plan_tiling

    config = DCAE_PRESETS["dc-ae-f32c32-sana-1.1"]
    with torch.device("meta"):
        dcae = DCAE(config).to(dtype).eval()
    budget = int(0.9 * (free_bytes - weight_bytes(dcae)))
    latents = torch.zeros(1, config.latent_channels, size // 32, size // 32, device="meta", dtype=dtype)
    plan = plan_tiling(dcae, "decode", tuple(latents.shape), None, None, budget)

    def decode():
        return dcae.decode(latents, memory_budget=budget)

    resident = list(dcae.parameters()) + list(dcae.buffers()) + [latents]
    return weight_bytes(dcae), peak_of(decode, resident), plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default="sana-1600m-4k", help="a DIT_PRESETS name")
    p.add_argument("--size", type=int, default=4096, help="image side in pixels")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=1, help="images per call (CFG doubles it in the DiT)")
    p.add_argument("--device-gib", type=float, default=16.0, help="the device's memory, for the DC-AE's tiling plan")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]

    dit_weights, denoise_peak, _ = denoise_stage(args.dit, args.size, dtype, args.batch)
    gemma_weights, encode_peak = text_encoder_stage(dtype)
    dcae_weights, decode_peak, plan = decode_stage(args.size, dtype, int(args.device_gib * 2**30) - dit_weights)
    latent_bytes = 3 * args.batch * 32 * (args.size // 32) ** 2 * 4  # x, x0 and the previous x0 in fp32
    image_bytes = args.batch * 3 * args.size**2 * 4  # the float32 image before it leaves the device

    stages = {
        "encode": dit_weights + gemma_weights + encode_peak,
        "denoise": dit_weights + denoise_peak + latent_bytes,
        "decode": dit_weights + dcae_weights + decode_peak + image_bytes,
    }
    print(f"{args.dit} at {args.size}², {args.dtype}, batch {args.batch} with CFG; modelled on the meta device")
    print(f"weights: DiT {gib(dit_weights)}, Gemma-2-2B {gib(gemma_weights)}, DC-AE {gib(dcae_weights)}")
    print(f"activations: encode +{gib(encode_peak)}, one denoising step +{gib(denoise_peak)}, "
          f"decode +{gib(decode_peak)} (tiling plan under a {args.device_gib:g} GiB device: {plan})")
    for name, total in stages.items():
        print(f"  {name:8s} {gib(total)}")
    peak = max(stages.values())
    print(f"modelled peak {gib(peak)} ({max(stages, key=stages.get)}); "
          f"{'within' if peak <= args.device_gib * 2**30 else 'over'} {args.device_gib:g} GiB")


if __name__ == "__main__":
    main()
