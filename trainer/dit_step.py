"""One optimizer step of DiT training, and the parts it acts on.

`build_parts` makes the model (from --init or a fresh --model, LoRA adapters injected, wrapped
for DDP/FSDP), the optimizer, the LR schedule, the fp16 scaler, the EMA and the generator every
random draw of a step comes from; `assemble_parts` does the same for any module whose trainable
parameters are the ones to train (`trainer.train_controlnet`'s ControlNet on a frozen DiT). `forward_backward` computes one global batch's gradients
(flow matching, as in SANA's recipe); `skip_reason` says, identically on every rank, whether
they may update anything.

The loss: u ~ logit-normal(mean, std), σ = shift·u / (1 + (shift−1)·u),
x_t = (1−σ)·x0 + σ·ε, target v = ε − x0, loss = mean((model(x_t, 1000σ, y) − v)²) (a
ControlNet's model also takes the sample's control latents), with the caption replaced by the empty prompt's embedding with probability `caption_dropout` (what
classifier-free guidance needs).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sana.dit import DIT_PRESETS, SanaDiT, SanaDiTConfig
from sana.dit_io import load_dit
from sana.errors import SanaCheckpointError, SanaInputError

from . import distributed
from .cache import LatentCache
from .data import pad_texts
from .dit_config import DiTTrainConfig
from .optimizers import make_optimizer


class EMA:
    """Exponential moving average of parameters, kept in fp32 (on `device`, default the
    parameters'): decay ramps up as (1+n)/(10+n)."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float, device: torch.device | str | None = None):
        self.decay = decay
        self.device = device
        self.shadow = {name: p.detach().to(device or p.device, torch.float32, copy=True) for name, p in named_params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in named_params.items():
            shadow = self.shadow[name]
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1 - decay)

    def state_dict(self) -> dict:
        """Whole tensors, also when the shadow holds FSDP shards (then a collective: every rank calls it)."""
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {k: distributed.full_tensor(v) for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict, like: dict[str, torch.Tensor] | None = None) -> None:
        """Load whole tensors; with `like` (the live parameters), each is laid out as its parameter is."""
        self.decay, self.updates = state["decay"], state["updates"]
        shadow = {}
        for name, value in state["shadow"].items():
            placed = distributed.shard_like(value, like[name]) if like is not None else value
            device = self.device or (distributed.local_tensor(like[name]).device if like is not None else placed.device)
            shadow[name] = placed.to(device, torch.float32, copy=True)
        self.shadow = shadow


class swapped:
    """Temporarily load `weights` (a name → tensor subset, e.g. the EMA's) into `model`."""

    def __init__(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self.model, self.weights = model, weights

    def __enter__(self):
        params = dict(self.model.named_parameters())
        self.saved = {n: params[n].detach().clone() for n in self.weights}
        with torch.no_grad():
            for n, w in self.weights.items():
                params[n].copy_(w)

    def __exit__(self, *exc):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, w in self.saved.items():
                params[n].copy_(w)


def sample_sigmas(batch: int, generator: torch.Generator, mean: float, std: float, shift: float) -> torch.Tensor:
    """Logit-normal u, then the flow shift σ = s·u / (1 + (s−1)·u)."""
    u = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(model, x0, context, mask, noise, sigma, autocast_dtype, control=None) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity ε − x0; `control` (the
    control latents) is passed on to a model that takes them."""
    s = sigma.view(-1, 1, 1, 1).to(x0)
    x_t = (1 - s) * x0 + s * noise
    extra = {} if control is None else {"control": control}
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        prediction = model(x_t, sigma.to(x0) * 1000, context, mask, **extra)
    return F.mse_loss(prediction.float(), (noise - x0).float())


WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(config: DiTTrainConfig, cache: LatentCache) -> SanaDiT:
    """The DiT to train, fp32 on the CPU: --init's weights, or a new --model seeded by --seed."""
    if config.init:
        return load_dit(config.init, dtype=torch.float32)
    if config.model in DIT_PRESETS:
        arch = DIT_PRESETS[config.model]
    else:
        path = Path(config.model)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise SanaCheckpointError(f"--model {path}: cannot be read as a JSON SanaDiTConfig: {error}") from None
        if not isinstance(values, dict):
            raise SanaCheckpointError(f"--model {path}: expected a JSON object of SanaDiTConfig fields")
        arch = SanaDiTConfig.from_dict(values)
    arch = arch.replace(in_channels=cache.latent_channels, out_channels=cache.latent_channels, caption_channels=cache.text_dim)
    torch.manual_seed(config.seed)
    return SanaDiT(arch)


@dataclass
class Parts:
    """The model and everything a checkpoint saves and restores with it."""

    model: SanaDiT
    wrapped: torch.nn.Module  # what runs the forward pass: the model, or its DDP/FSDP wrapper
    trained: dict[str, torch.Tensor]  # the parameters that train (FSDP: this rank's shards)
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # every random draw of a step
    partial: bool = False  # only `trained` is saved: the rest is --init's, rebuilt on resume (LoRA, ControlNet)
    control: bool = False  # the model takes each sample's control latents (a ControlNet on a frozen DiT)

    def optimizer_step(self) -> None:
        """Apply the step's gradients (optimizer, fp16 scale, LR schedule); the EMA follows once
        the caller has checked the new weights."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def skip_step(self) -> None:
        """Drop the step's gradients: no optimizer, EMA or schedule update; only the fp16 scaler
        learns from them (it lowers its scale)."""
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def finite(self) -> bool:
        """Whether this rank's trained weights and EMA are finite."""
        return all_finite([*self.trained.values(), *(self.ema.shadow.values() if self.ema is not None else [])])


def build_parts(config: DiTTrainConfig, cache: LatentCache, world) -> Parts:
    """The model on the device in --weights-dtype (a LoRA's adapters in fp32 on a frozen base),
    wrapped for DDP/FSDP, and what trains it."""
    model = build_model(config, cache).to(world.device, WEIGHT_DTYPES[config.weights_dtype]).train()
    model.enable_gradient_checkpointing(config.grad_checkpointing)
    if config.lora_rank:
        from sana.lora import inject_lora

        model.requires_grad_(False)
        inject_lora(model, rank=config.lora_rank, alpha=config.lora_alpha or config.lora_rank, targets=config.lora_targets, seed=config.seed)
    return assemble_parts(model, config, world, partial=bool(config.lora_rank))


def assemble_parts(model: torch.nn.Module, config: DiTTrainConfig, world, *, partial: bool, control: bool = False) -> Parts:
    """`model` (on the device, its parameters to train the ones that require gradients) wrapped for
    DDP/FSDP, with the optimizer, LR schedule, fp16 scaler, EMA and generator that train it."""
    wrapped = distributed.wrap_model(model, world, config.distributed, cpu_offload=config.fsdp_cpu_offload)
    # FSDP replaces the parameters by their shards: take them, and the EMA's copies, after wrapping.
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(list(trained.values()), config.optimizer, lr=config.lr, betas=config.betas, eps=config.eps,
                               weight_decay=config.weight_decay, seed=config.seed)
    warmup = config.warmup_steps
    return Parts(
        model=model,
        wrapped=wrapped,
        trained=trained,
        ema=EMA(trained, config.ema_decay, "cpu" if config.ema_device == "cpu" else None) if config.ema_decay > 0 else None,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0),
        scaler=torch.amp.GradScaler(world.device.type, enabled=config.mixed_precision == "fp16"),
        generator=torch.Generator().manual_seed(config.seed),
        partial=partial,
        control=control,
    )


def micro_batch_size(config: DiTTrainConfig, world) -> int:
    """Samples per forward pass on each rank: the global batch over processes × accumulation steps."""
    per_step = world.size * config.grad_accum
    if config.batch_size % per_step:
        raise SanaInputError(
            f"--batch-size {config.batch_size}: not divisible by processes × --grad-accum = {world.size} × {config.grad_accum}"
        )
    return config.batch_size // per_step


def forward_backward(parts: Parts, cache: LatentCache, indices: list[int], config: DiTTrainConfig, world, micro: int,
                     autocast_dtype, shift: float) -> tuple[float, float]:
    """One global batch's gradients, unscaled and clipped; returns (mean loss over all ranks, grad norm)."""
    # Everything random is drawn for the global batch, identically on every rank.
    generator = parts.generator
    items = [cache[i] for i in indices]
    drop = torch.rand(len(items), generator=generator) < config.caption_dropout
    noise = torch.randn((len(items), *items[0][0].shape), generator=generator)
    sigma = sample_sigmas(len(items), generator, config.logit_mean, config.logit_std, shift)
    null_text = cache.null_text.float()
    texts = [null_text if d else text.float() for (_, text), d in zip(items, drop.tolist())]
    mirrored = [False] * len(items)
    if config.flip:  # drawn only then, so runs without flips keep their random sequence
        mirrored = (torch.rand(len(items), generator=generator) < 0.5).tolist()
        items = [(cache.flipped(i), text) if m else (latent, text) for i, (latent, text), m in zip(indices, items, mirrored)]
    latents = torch.stack([latent.float() for latent, _ in items])
    controls = torch.stack([cache.control(i, mirrored=m).float() for i, m in zip(indices, mirrored)]) if parts.control else None

    mine = slice(world.rank * micro * config.grad_accum, (world.rank + 1) * micro * config.grad_accum)
    total_loss = torch.zeros((), device=world.device)
    for k in range(config.grad_accum):
        part = slice(mine.start + k * micro, mine.start + (k + 1) * micro)
        context, mask = pad_texts(texts[part])
        sync = k == config.grad_accum - 1 or not world.distributed
        with _maybe_no_sync(parts.wrapped, sync):
            loss = flow_matching_loss(
                parts.wrapped,
                latents[part].to(world.device),
                context.to(world.device),
                mask.to(world.device),
                noise[part].to(world.device),
                sigma[part],
                autocast_dtype,
                controls[part].to(world.device) if controls is not None else None,
            )
            parts.scaler.scale(loss / config.grad_accum).backward()
        total_loss += loss.detach() / config.grad_accum
    parts.scaler.unscale_(parts.optimizer)
    # Clipping at infinity measures the norm and leaves the gradients as they are (× 1.0).
    # Under FSDP the norm is a DTensor; make it whole here, where every rank runs.
    clip = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(parts.trained.values(), clip)))
    return float(distributed.all_reduce_mean(total_loss, world)), grad_norm


def _maybe_no_sync(wrapped, sync: bool):
    return contextlib.nullcontext() if sync or not hasattr(wrapped, "no_sync") else wrapped.no_sync()


FP16_OVERFLOW = "fp16 gradient overflow (the loss scale is lowered)"


def skip_reason(loss: float, grad_norm: float, scaler: torch.amp.GradScaler, world) -> str | None:
    """Why this step must not update anything, or None; every rank reaches the same answer.

    A finite loss with non-finite gradients under the fp16 scaler is its routine overflow (not
    counted against --max-nan-losses); anything else non-finite is a bad step."""
    # Each flag is agreed on separately: the reason decides what is counted, so it must match too.
    loss_finite = distributed.all_ranks_agree(math.isfinite(loss), world)
    grads_finite = distributed.all_ranks_agree(math.isfinite(grad_norm), world)
    if loss_finite and grads_finite:
        return None
    if not loss_finite:
        return "non-finite loss"
    return FP16_OVERFLOW if scaler.is_enabled() else "non-finite gradients"


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor (this rank's shard of a DTensor) holds finite values."""
    floats = [distributed.local_tensor(t) for t in tensors]
    floats = [t.detach() for t in floats if t.is_floating_point() and t.numel()]
    return not floats or bool(torch.stack([t.isfinite().all() for t in floats]).all())
