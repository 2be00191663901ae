"""Peak device memory of DiT training (`python -m trainer dit`), modelled on the meta device:
`plan_training_memory(preset, resolution, batch, options)`. `bench/train_memory_model.py` prints
it for each memory option; the README's table comes from there.

A step's peak, once the optimizer holds its states (every step after the first):

    weights + EMA + optimizer states + max(forward and backward, gradients + optimizer step)

- weights: every DiT weight in `--weights-dtype` (a LoRA's adapters in fp32), counted;
- EMA: 4 bytes a trained weight with `--ema-device same`, none on the CPU or off;
- optimizer states, counted as the optimizers allocate them: AdamW 8 bytes a trained weight
  (fp32 moments, also `StochasticAdamW`'s for bf16 weights), bitsandbytes' 8-bit AdamW 2 bytes
  (weights under 4096 elements keep 8), CAME 4 (its factored second moments are small);
- forward and backward: measured by running them on meta tensors under `sana.memory_plan.LiveBytes`
  at the batch and resolution, the caption padded to 300 tokens: every activation autograd keeps,
  and the gradients as backward makes them; with gradient checkpointing the blocks' activations
  are recomputed (`SanaDiT`'s own checkpointing runs on meta too);
- the optimizer step's temporaries: PyTorch's AdamW on CUDA runs the multi-tensor path, whose
  √v is a temporary of 4 bytes a trained weight; the per-tensor optimizers' are one tensor's.

Autocast does not run on meta tensors, so `--mixed-precision bf16` over fp32 weights is modelled
as the bf16 forward it is, plus the bf16 copies of the weights that autocast makes and autograd
keeps for backward (2 bytes a weight), plus fp32 gradients instead of bf16 ones.

FSDP with CPU offload (`--fsdp-cpu-offload`) keeps weights, gradients, optimizer states and the
EMA in CPU memory: the device holds the activations (the peak without the gradients, which move
off block by block), the root module's weights (embedders, final layer: not sharded per block)
and two blocks' weights and gradients at a time (the one computing and the one prefetched).

Not seen by the model, so the measured peak is higher: the CUDA context and cuBLAS workspaces
(about 0.5-1 GB), the caching allocator's rounding and fragmentation, NCCL buffers under torchrun.
Pessimistic: attention and the fused kernels take their reference paths on meta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sana.dit import DIT_PRESETS, SanaDiT, SanaDiTConfig
from sana.errors import SanaInputError
from sana.memory_plan import CAPTION_TOKENS, LATENT_SCALE, LiveBytes, storage_key

BYTES = {"fp32": 4, "bf16": 2}
STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "came": 4}
EIGHT_BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for smaller tensors
LORA_TARGETS = ("to_q", "to_k", "to_v")  # the trainer's default --lora-targets


@dataclass(frozen=True)
class TrainingOptions:
    """The trainer's options that decide its memory (named as `python -m trainer dit` spells them)."""

    lora_rank: int = 0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    weights_dtype: str = "fp32"  # --weights-dtype
    mixed_precision: str = "bf16"  # --mixed-precision: "no" or "bf16"
    optimizer: str = "adamw"  # --optimizer
    ema: str = "same"  # --ema-device same or cpu, or "off" (--ema-decay 0)
    grad_checkpointing: bool = False
    fsdp_cpu_offload: bool = False

    def check(self) -> None:
        if self.weights_dtype not in BYTES or self.optimizer not in STATE_BYTES or self.ema not in ("same", "cpu", "off"):
            raise SanaInputError(f"unknown training options {self}")
        if self.mixed_precision not in ("no", "bf16"):
            raise SanaInputError(f"mixed_precision {self.mixed_precision!r}: the model knows no and bf16")

    def flags(self) -> str:
        """The options as trainer flags."""
        parts = [f"--lora-rank {self.lora_rank}"] if self.lora_rank else ["full"]
        parts.append(f"--weights-dtype {self.weights_dtype}")
        if self.weights_dtype == "fp32":
            parts.append(f"--mixed-precision {self.mixed_precision}")
        if self.optimizer != "adamw":
            parts.append(f"--optimizer {self.optimizer}")
        if not self.fsdp_cpu_offload:  # offloaded, the EMA lives with the CPU shards
            parts.append({"same": "EMA on GPU", "cpu": "--ema-device cpu", "off": "--ema-decay 0"}[self.ema])
        if self.grad_checkpointing:
            parts.append("--grad-checkpointing true")
        if self.fsdp_cpu_offload:
            parts.append("--distributed fsdp --fsdp-cpu-offload true")
        return " ".join(parts)


@dataclass(frozen=True)
class TrainingMemory:
    """Modelled device bytes of a training step; `peak` is the total."""

    preset: str | SanaDiTConfig
    resolution: int
    batch: int
    options: TrainingOptions
    weights: int
    ema: int
    optimizer_states: int
    gradients: int  # the trained weights' gradients, once backward is done
    forward_backward: int  # the peak of forward + backward beyond the weights (activations and gradients)
    optimizer_step: int  # the optimizer step's temporaries

    @property
    def peak(self) -> int:
        resident = self.weights + self.ema + self.optimizer_states
        return resident + max(self.forward_backward, self.gradients + self.optimizer_step)


def build_model(config: SanaDiTConfig, options: TrainingOptions, dtype: torch.dtype, device: str = "meta") -> SanaDiT:
    """The DiT on `device` (meta: shapes only) in `dtype`, with the LoRA adapters (fp32) the
    options ask for; only the trained weights require grad."""
    with torch.device(device):
        model = SanaDiT(config).to(dtype)
    if options.lora_rank:
        from sana.lora import inject_lora

        inject_lora(model, rank=options.lora_rank, targets=options.lora_targets)
    model.enable_gradient_checkpointing(options.grad_checkpointing)
    return model.train()


def step_inputs(model: SanaDiT, latent_side: int, batch: int, device: str = "meta") -> list[torch.Tensor]:
    """A training batch: noisy latents, timesteps, the caption at 300 tokens and its mask."""
    config = model.config
    x = torch.randn(batch, config.in_channels, latent_side, latent_side, device=device)
    t = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, CAPTION_TOKENS, config.caption_channels, device=device)
    mask = torch.ones(batch, CAPTION_TOKENS, dtype=torch.long, device=device)
    return [x, t, context, mask]


def measure_forward_backward(model: torch.nn.Module, inputs: list[torch.Tensor]) -> tuple[int, int]:
    """(peak bytes of forward + backward beyond the weights and inputs, the same peak without the
    parameters' gradients) for the flow-matching loss on `inputs`; works on meta and real tensors."""
    resident = [*model.parameters(), *model.buffers(), *inputs]
    with LiveBytes(resident) as mode:
        x, t, context, mask = inputs
        prediction = model(x, t, context, mask, trim_context=False)
        loss = (prediction.float() - x).square().mean()
        loss.backward()
        del prediction, loss
    gradients = {storage_key(p.grad) for p in model.parameters() if p.grad is not None}
    return mode.peak, mode.peak_without(gradients)


def _trained(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(trained: list[torch.Tensor], optimizer: str) -> int:
    """The optimizer states' bytes for `trained` (see the module docstring)."""
    if optimizer == "adamw8bit":
        return sum(p.numel() * (2 if p.numel() >= EIGHT_BIT_MIN_SIZE else 8) for p in trained)
    return sum(p.numel() for p in trained) * STATE_BYTES[optimizer]


def plan_training_memory(preset: str | SanaDiTConfig, resolution: int, batch: int, options: TrainingOptions) -> TrainingMemory:
    """Model one training step of the DiT `preset` (a DIT_PRESETS name or a config) at
    `resolution`² pixels (the SANA DC-AE's 32× latents) with `batch` samples."""
    options.check()
    if isinstance(preset, str) and preset not in DIT_PRESETS:
        raise SanaInputError(f"model {preset!r} is not a DiT preset; known: {', '.join(sorted(DIT_PRESETS))}")
    if resolution <= 0 or resolution % LATENT_SCALE or batch < 1:
        raise SanaInputError(f"resolution {resolution}, batch {batch}: a positive multiple of {LATENT_SCALE}, and at least 1")
    config = DIT_PRESETS[preset] if isinstance(preset, str) else preset
    weights_dtype = torch.float32 if options.weights_dtype == "fp32" else torch.bfloat16
    autocast = options.weights_dtype == "fp32" and options.mixed_precision == "bf16"
    counted = build_model(config, options, weights_dtype)
    trained = _trained(counted)
    # Activations in the compute dtype: autocast's bf16 forward is measured on a bf16 model.
    measured = build_model(config, options, torch.bfloat16) if autocast else counted
    inputs = step_inputs(measured, resolution // LATENT_SCALE, batch)
    forward_backward, activations = measure_forward_backward(measured, inputs)
    gradients = _bytes(trained)
    if autocast:
        weight_casts = sum(p.numel() for p in counted.parameters() if p.dtype == torch.float32 and p.ndim > 1) * 2
        forward_backward += weight_casts + gradients - _bytes(_trained(measured))
        activations += weight_casts
    foreach_adamw = options.optimizer == "adamw" and all(p.dtype == torch.float32 for p in trained)
    optimizer_step = sum(p.numel() for p in trained) * 4 if foreach_adamw else max(p.numel() for p in trained) * 16
    ema = sum(p.numel() for p in trained) * 4 if options.ema == "same" else 0
    weights = _bytes(counted.parameters())
    states = state_bytes(trained, options.optimizer)
    if options.fsdp_cpu_offload:
        return _offloaded(preset, resolution, batch, options, counted, activations)
    return TrainingMemory(preset, resolution, batch, options, weights, ema, states, gradients, forward_backward, optimizer_step)


def _offloaded(preset: str, resolution: int, batch: int, options: TrainingOptions, model: SanaDiT, activations: int) -> TrainingMemory:
    """FSDP2 with CPU offload on one GPU: see the module docstring."""
    block = _bytes(model.blocks[0].parameters())
    root = _bytes(model.parameters()) - block * len(model.blocks)
    gathered = root + 2 * block
    return TrainingMemory(preset, resolution, batch, options, weights=gathered, ema=0, optimizer_states=0,
                          gradients=2 * block, forward_backward=activations + 2 * block, optimizer_step=0)
