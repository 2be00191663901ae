"""Peak device memory of a whole `sana.generate` call, modelled on the meta device (no GPU, no
weights): `plan_generation_memory(preset, width, height, ...)`. `python -m sana doctor` prints it;
`bench/memory_model.py` is its command line for the benchmarks. `LiveBytes`, the counting itself,
also serves the trainer's model of a training step (`trainer.memory_plan`).

Every stage runs for real on meta tensors (shapes and dtypes, no data) under a dispatch mode that
counts the bytes of every storage an operation creates and releases them when their last tensor
dies; weights are counted as resident. Per stage, as `generate` runs it on one device:

- encode: the DiT's weights (already on the device) + Gemma-2-2B's weights + its forward on the
  prompt (300 tokens + the CHI);
- denoise: the DiT's weights + one CFG step (batch 2 through the DiT, the caption at its full 300
  padded tokens, as no trimming happens on meta) + the sampler's latents;
- decode: the DiT's and the DC-AE's weights + the decode with the tiling `generate` picks when the
  device has `device_bytes` in all (the DC-AE plans its tiles from the free memory) + the image.

What a model cannot see, so the measured peak will be higher: the caching allocator's rounding and
fragmentation, cuBLAS/cuDNN workspaces and the CUDA context (about 0.5 GB). What makes it
pessimistic: the fused Triton kernels are not used on meta (their references allocate more), and
PyTorch's attention on meta takes the math route, which materialises the cross-attention scores
(flash/memory-efficient attention on a GPU does not).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .dcae import DCAE, DCAE_PRESETS
from .dcae_tiling import plan_tiling
from .dit import DIT_PRESETS, SanaDiT
from .errors import SanaInputError
from .samplers import guided_velocity

GEMMA_2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256)
CAPTION_TOKENS = 300
CHI_TOKENS = 250  # the complex human instruction's length in Gemma tokens (about), prepended to the prompt
DCAE_PRESET = "dc-ae-f32c32-sana-1.1"
LATENT_SCALE = 32  # pixels per latent side of the SANA DC-AE


def storage_key(t: torch.Tensor) -> int:
    """The identity of the storage behind `t` (views share it)."""
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode; `peak` is the most alive at once.

    `events` records each storage's creation (+bytes) and release (−bytes) in order, so that
    `peak_without(keys)` can give the peak had some storages (e.g. gradients that a CPU-offloading
    trainer moves off the device) never been there."""

    def __init__(self, resident: list[torch.Tensor]):
        super().__init__()
        self.external = {storage_key(t) for t in resident}
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0
        self.events: list[tuple[int, int]] = []

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes
            self.events.append((key, -nbytes))

    def peak_without(self, keys: set[int]) -> int:
        """The peak over the recorded events leaving out the storages `keys` (`storage_key`s)."""
        live = peak = 0
        for key, delta in self.events:
            if key not in keys:
                live += delta
                peak = max(peak, live)
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = storage_key(t)
            if key in self.external:
                continue
            nbytes = t.untyped_storage().nbytes()
            if key not in self.refs:
                self.refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.events.append((key, nbytes))
            self.refs[key] += 1
            weakref.finalize(t, self._release, key, nbytes)
        return out


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def peak_of(fn: Callable[[], object], resident: list[torch.Tensor]) -> int:
    """The most bytes alive at once while `fn` runs, not counting `resident` tensors."""
    with torch.no_grad(), LiveBytes(resident) as mode:
        out = fn()
        del out
    return mode.peak


def text_encoder_stage(dtype: torch.dtype) -> tuple[int, int]:
    """(Gemma-2-2B's weight bytes, its forward's activation peak) on one prompt with the CHI."""
    from transformers import Gemma2Config, Gemma2Model  # a second to import: only when modelling

    config = Gemma2Config(**GEMMA_2_2B, attn_implementation="eager")
    with torch.device("meta"):
        gemma = Gemma2Model(config).to(dtype).eval()
    tokens = torch.zeros(1, CAPTION_TOKENS + CHI_TOKENS, dtype=torch.long, device="meta")
    mask = torch.ones_like(tokens)

    def forward():
        return gemma(input_ids=tokens, attention_mask=mask).last_hidden_state

    return weight_bytes(gemma), peak_of(forward, list(gemma.parameters()) + list(gemma.buffers()))


def denoise_stage(preset: str, width: int, height: int, dtype: torch.dtype, batch: int) -> tuple[int, int]:
    """(the DiT's weight bytes, one CFG step's activation peak)."""
    config = DIT_PRESETS[preset]
    with torch.device("meta"):
        dit = SanaDiT(config).to(dtype).eval()
    x = torch.zeros(batch, config.in_channels, height // LATENT_SCALE, width // LATENT_SCALE, device="meta")
    context = torch.zeros(2 * batch, CAPTION_TOKENS, config.caption_channels, device="meta", dtype=dtype)
    mask = torch.ones(2 * batch, CAPTION_TOKENS, device="meta")
    velocity = guided_velocity(lambda x_, t_: dit(x_.to(dtype), t_, context, mask, trim_context=False),
                               guidance_scale=4.5)
    t = torch.full((batch,), 999.0, device="meta")

    def step():
        v = velocity(x, t)
        return x - 0.5 * v  # the solver's update: x0 and the next x, float32

    resident = list(dit.parameters()) + list(dit.buffers()) + [x, context, mask, t]
    return weight_bytes(dit), peak_of(step, resident)


def decode_stage(width: int, height: int, dtype: torch.dtype, free_bytes: int) -> tuple[int, int, tuple]:
    """(the DC-AE's weight bytes, the decode's activation peak, its tiling plan) as `generate`
    runs it: the DC-AE plans its tiles from 90% of what is free
    (`sana.dcae_tiling.default_memory_budget`) once its own weights are on the device."""
    config = DCAE_PRESETS[DCAE_PRESET]
    with torch.device("meta"):
        dcae = DCAE(config).to(dtype).eval()
    budget = int(0.9 * (free_bytes - weight_bytes(dcae)))
    latents = torch.zeros(1, config.latent_channels, height // LATENT_SCALE, width // LATENT_SCALE, device="meta", dtype=dtype)
    plan = plan_tiling(dcae, "decode", tuple(latents.shape), None, None, budget)

    def decode():
        return dcae.decode(latents, memory_budget=budget)

    resident = list(dcae.parameters()) + list(dcae.buffers()) + [latents]
    return weight_bytes(dcae), peak_of(decode, resident), plan


@dataclass(frozen=True)
class MemoryPlan:
    """Modelled bytes of one `generate` call. `stages` holds each stage's total (resident weights
    + activations + latents or image); `peak` is the largest."""

    preset: str
    width: int
    height: int
    dtype: torch.dtype
    batch: int
    device_bytes: int
    weights: dict[str, int]  # "dit", "text_encoder", "dcae"
    activations: dict[str, int]  # "encode", "denoise", "decode"
    stages: dict[str, int]
    tiling: tuple

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_bytes


def check_plan_inputs(preset: str, width: int, height: int, batch: int) -> None:
    """Refuse what `plan_generation_memory` cannot model, before any work."""
    if preset not in DIT_PRESETS:
        raise SanaInputError(f"model {preset!r} is not a DiT preset; known: {', '.join(sorted(DIT_PRESETS))}")
    if width <= 0 or height <= 0 or width % LATENT_SCALE or height % LATENT_SCALE:
        raise SanaInputError(f"size {width}x{height}: width and height must be positive multiples of {LATENT_SCALE}")
    if batch < 1:
        raise SanaInputError(f"batch {batch}: must be at least 1")


def plan_generation_memory(preset: str, width: int, height: int, *, dtype: torch.dtype = torch.bfloat16,
                           batch: int = 1, device_bytes: int = 16 * 2**30) -> MemoryPlan:
    """Model the peak device memory of `generate` with the DiT preset `preset` at `width`×`height`
    (multiples of 32), `batch` images with CFG, every model in `dtype`, on a device of `device_bytes`."""
    check_plan_inputs(preset, width, height, batch)
    dit_weights, denoise_peak = denoise_stage(preset, width, height, dtype, batch)
    gemma_weights, encode_peak = text_encoder_stage(dtype)
    dcae_weights, decode_peak, tiling = decode_stage(width, height, dtype, device_bytes - dit_weights)
    latent_pixels = (width // LATENT_SCALE) * (height // LATENT_SCALE)
    latent_bytes = 3 * batch * 32 * latent_pixels * 4  # x, x0 and the previous x0 in fp32
    image_bytes = batch * 3 * width * height * 4  # the float32 image before it leaves the device
    return MemoryPlan(
        preset=preset, width=width, height=height, dtype=dtype, batch=batch, device_bytes=device_bytes,
        weights={"dit": dit_weights, "text_encoder": gemma_weights, "dcae": dcae_weights},
        activations={"encode": encode_peak, "denoise": denoise_peak, "decode": decode_peak},
        stages={
            "encode": dit_weights + gemma_weights + encode_peak,
            "denoise": dit_weights + denoise_peak + latent_bytes,
            "decode": dit_weights + dcae_weights + decode_peak + image_bytes,
        },
        tiling=tiling,
    )
