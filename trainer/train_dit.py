"""Flow-matching training of the SANA DiT (full fine-tune or LoRA) on a latent cache.

One step, as in SANA's recipe (docs: peers_and_perf.md §4):
    u ~ logit-normal(mean, std),  σ = shift·u / (1 + (shift−1)·u)
    x_t = (1−σ)·x0 + σ·ε,         target v = ε − x0,   loss = mean((model(x_t, 1000σ, y) − v)²)
with the caption replaced by the empty prompt's embedding with probability `caption_dropout`
(what classifier-free guidance needs). AdamW (or CAME when `came_pytorch` is installed),
linear warm-up then constant LR, gradient clipping, EMA of the trained weights, bf16/fp16
autocast, gradient checkpointing and accumulation.

Determinism: every random draw of a step (noise, σ, dropout) comes from one CPU generator
whose state is checkpointed, and is drawn for the whole global batch on every rank (each
rank then takes its slice); batches come from `BucketBatches`, a pure function of
(seed, epoch). So resuming from a checkpoint reproduces the uninterrupted run exactly, and
N processes see the same samples and noise as one process with the same global batch.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sana.checkpoint import write_json, write_torch
from sana.dit import DIT_PRESETS, SanaDiT, SanaDiTConfig
from sana.dit_io import load_dit, save_dit

from . import distributed
from .data import BucketBatches, LatentCache, pad_texts
from .options import option, to_dict
from .plotting import image_grid, plot_loss, to_uint8


@dataclass
class DiTTrainConfig:
    output_dir: str = option("runs/dit", "where checkpoints, logs, samples and exported weights go")
    cache_dir: str = option("", "latent/text cache folder (built by `python -m trainer cache`)")
    init: str = option("", "checkpoint to fine-tune (anything sana.load_dit reads); empty: train from scratch")
    model: str = option("", "architecture when training from scratch: a DIT_PRESETS name or a JSON SanaDiTConfig file")
    vae: str = option("", "DC-AE checkpoint, only used to decode sample grids")
    steps: int = option(1000, "optimizer steps to train")
    batch_size: int = option(16, "global batch size (all processes, all accumulation micro-steps)")
    grad_accum: int = option(1, "gradient accumulation micro-steps per optimizer step")
    optimizer: str = option("adamw", "adamw, or came (needs the came_pytorch package)", choices=["adamw", "came"])
    lr: float = option(1e-4, "peak learning rate")
    weight_decay: float = option(0.0, "decoupled weight decay")
    betas: list[float] = option([0.9, 0.999], "Adam betas (CAME: three values)")
    eps: float = option(1e-8, "Adam epsilon")
    warmup_steps: int = option(0, "linear warm-up steps, then constant LR")
    grad_clip: float = option(1.0, "max gradient norm (0 disables)")
    ema_decay: float = option(0.999, "EMA decay of the trained weights (0 disables EMA)")
    mixed_precision: str = option("no", "autocast dtype for the forward pass", choices=["no", "bf16", "fp16"])
    grad_checkpointing: bool = option(False, "recompute block activations in backward to save memory")
    caption_dropout: float = option(0.1, "probability of training a sample on the empty prompt (for CFG)")
    logit_mean: float = option(0.0, "logit-normal timestep sampling mean")
    logit_std: float = option(1.0, "logit-normal timestep sampling std")
    flow_shift: float = option(0.0, "training σ shift; 0 uses the model config's flow_shift")
    seed: int = option(0, "seed for initialisation, data order and noise")
    log_every: int = option(10, "steps between loss-log rows")
    save_every: int = option(500, "steps between resumable checkpoints and exported weights (0: only at the end)")
    keep_checkpoints: int = option(2, "resumable checkpoints kept on disk")
    sample_every: int = option(0, "steps between sample grids (0 disables; needs --vae and cached sample prompts)")
    sample_steps: int = option(20, "Flow-DPM-Solver steps for sample grids")
    sample_guidance: float = option(4.5, "CFG scale for sample grids")
    lora_rank: int = option(0, "train a LoRA of this rank instead of the full model (0: full fine-tune)")
    lora_alpha: float = option(0.0, "LoRA alpha (0: equal to the rank)")
    lora_targets: list[str] = option(["to_q", "to_k", "to_v"], "LoRA target layers, diffusers module names or suffixes (to_q, to_out.0, attn2.to_k, conv_inverted, ...)")
    distributed: str = option("ddp", "multi-process strategy under torchrun", choices=["ddp", "fsdp"])
    device: str = option("auto", "cpu, cuda or auto")
    resume: bool = option(True, "continue from the latest checkpoint in output_dir if there is one")
    progress: bool = option(True, "show a progress bar")
    max_nan_losses: int = option(20, "abort after this many non-finite losses")


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of parameters, kept in fp32: decay ramps up as (1+n)/(10+n)."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in named_params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in named_params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    def state_dict(self) -> dict:
        """Whole tensors, also when the shadow holds FSDP shards (then a collective: every rank calls it)."""
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {k: distributed.full_tensor(v) for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict, like: dict[str, torch.Tensor] | None = None) -> None:
        """Load whole tensors; with `like` (the live parameters), each is laid out as its parameter is."""
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: (distributed.shard_like(v, like[k]) if like is not None else v).clone()
                       for k, v in state["shadow"].items()}


def sample_sigmas(batch: int, generator: torch.Generator, mean: float, std: float, shift: float) -> torch.Tensor:
    """Logit-normal u, then the flow shift σ = s·u / (1 + (s−1)·u)."""
    u = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(model, x0, context, mask, noise, sigma, autocast_dtype) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity ε − x0."""
    s = sigma.view(-1, 1, 1, 1).to(x0)
    x_t = (1 - s) * x0 + s * noise
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        prediction = model(x_t, sigma.to(x0) * 1000, context, mask)
    return F.mse_loss(prediction.float(), (noise - x0).float())


def make_optimizer(params, config: DiTTrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "came":
        try:
            from came_pytorch import CAME
        except ImportError:
            raise SystemExit("optimizer=came needs the came_pytorch package (pip install came-pytorch)") from None
        betas = tuple(config.betas) if len(config.betas) == 3 else (0.9, 0.999, 0.9999)
        return CAME(params, lr=config.lr, weight_decay=config.weight_decay, betas=betas, eps=(1e-30, 1e-16))
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas[:2]), eps=config.eps, weight_decay=config.weight_decay)


def build_model(config: DiTTrainConfig, cache: LatentCache) -> SanaDiT:
    if config.init:
        return load_dit(config.init, dtype=torch.float32)
    if not config.model:
        raise SystemExit("give --init (a checkpoint to fine-tune) or --model (a preset or JSON config to train from scratch)")
    if config.model in DIT_PRESETS:
        arch = DIT_PRESETS[config.model]
    else:
        arch = SanaDiTConfig.from_dict(json.loads(Path(config.model).read_text()))
    arch = arch.replace(in_channels=cache.latent_channels, out_channels=cache.latent_channels, caption_channels=cache.text_dim)
    torch.manual_seed(config.seed)
    return SanaDiT(arch)


def rng_state(generator: torch.Generator) -> dict:
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = output_dir / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    path = output_dir / "checkpoints" / json.loads(pointer.read_text())["name"]
    return path if (path / "state.pt").is_file() else None


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_dit(config: DiTTrainConfig) -> dict:
    """Train; returns a summary (final loss, steps, seconds, output folder) and the trained `model`."""
    world = distributed.init_world(config.device)
    out = Path(config.output_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", to_dict(config))
    cache = LatentCache(config.cache_dir)
    micro = config.batch_size // (world.size * config.grad_accum)
    if micro * world.size * config.grad_accum != config.batch_size:
        raise SystemExit(f"batch_size {config.batch_size} is not divisible by processes × grad_accum = {world.size * config.grad_accum}")

    model = build_model(config, cache).float().to(world.device).train()
    model.enable_gradient_checkpointing(config.grad_checkpointing)
    if config.lora_rank:
        from sana.lora import inject_lora

        model.requires_grad_(False)
        inject_lora(model, rank=config.lora_rank, alpha=config.lora_alpha or config.lora_rank, targets=config.lora_targets, seed=config.seed)
    if config.distributed == "fsdp" and config.lora_rank:
        raise ValueError("LoRA training runs with --distributed ddp; fsdp is for full fine-tunes of models that do not fit one GPU")
    wrapped = distributed.wrap_model(model, world, config.distributed)
    # FSDP replaces the parameters by their shards: take them, and the EMA's copies, after wrapping.
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ema = EMA(trained, config.ema_decay) if config.ema_decay > 0 else None
    optimizer = make_optimizer(list(trained.values()), config)
    warmup = max(config.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]
    scaler = torch.amp.GradScaler(world.device.type, enabled=autocast_dtype == torch.float16)
    shift = config.flow_shift or model.config.flow_shift
    generator = torch.Generator().manual_seed(config.seed)
    sampler = BucketBatches([cache.latent_size(i) for i in range(len(cache))], config.batch_size, config.seed)
    null_text = cache.null_text.float()

    step, epoch, batch_index = 0, 0, 0
    checkpoint = latest_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
        distributed.load_full_state_dict(wrapped, config.distributed, state["model"])
        distributed.load_optimizer_state_dict(wrapped, optimizer, config.distributed, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"], like=trained)
        set_rng_state(generator, state["rng"])
        step, (epoch, batch_index) = state["step"], state["data_position"]
        if world.is_main:
            print(f"resumed from {checkpoint} at step {step}")
            _truncate_log(out / "loss.jsonl", step)

    batches = sampler.iterate(epoch, batch_index)
    bar = _progress_bar(config, world, step)
    nan_losses, started, last_loss = 0, time.time(), float("nan")
    while step < config.steps:
        epoch, batch_index, indices = next(batches)
        # Everything random is drawn for the global batch, identically on every rank.
        items = [cache[i] for i in indices]
        drop = torch.rand(len(items), generator=generator) < config.caption_dropout
        noise = torch.randn((len(items), *items[0][0].shape), generator=generator)
        sigma = sample_sigmas(len(items), generator, config.logit_mean, config.logit_std, shift)
        texts = [null_text if d else text.float() for (_, text), d in zip(items, drop.tolist())]
        latents = torch.stack([latent.float() for latent, _ in items])

        mine = slice(world.rank * micro * config.grad_accum, (world.rank + 1) * micro * config.grad_accum)
        total_loss = torch.zeros((), device=world.device)
        for k in range(config.grad_accum):
            part = slice(mine.start + k * micro, mine.start + (k + 1) * micro)
            context, mask = pad_texts(texts[part])
            sync = k == config.grad_accum - 1 or not world.distributed
            with _maybe_no_sync(wrapped, sync):
                loss = flow_matching_loss(
                    wrapped,
                    latents[part].to(world.device),
                    context.to(world.device),
                    mask.to(world.device),
                    noise[part].to(world.device),
                    sigma[part],
                    autocast_dtype,
                )
                scaler.scale(loss / config.grad_accum).backward()
            total_loss += loss.detach() / config.grad_accum
        scaler.unscale_(optimizer)
        if config.grad_clip > 0:
            # Under FSDP the norm is a DTensor; make it whole here, where every rank runs.
            grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(trained.values(), config.grad_clip))
        else:
            grad_norm = torch.zeros(())
        loss_value = float(distributed.all_reduce_mean(total_loss, world))
        if not math.isfinite(loss_value):
            nan_losses += 1
            if nan_losses >= config.max_nan_losses:
                raise RuntimeError(f"{nan_losses} non-finite losses; last at step {step}")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update(trained)
        step += 1
        last_loss = loss_value
        batch_index += 1

        if world.is_main:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % config.log_every == 0 or step == config.steps:
                row = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "epoch": epoch, "seconds": round(time.time() - started, 3)}
                with open(out / "loss.jsonl", "a") as log:
                    log.write(json.dumps(row) + "\n")
        # Sharded weights need every rank in the forward passes; only the main rank writes the grid.
        if config.sample_every and step % config.sample_every == 0 and (world.is_main or distributed.is_sharded(model)):
            write_samples(model, ema, cache, config, out / "samples" / f"step_{step:07d}.png", write=world.is_main)
        if (config.save_every and step % config.save_every == 0) or step == config.steps:
            state = {
                "model": distributed.full_state_dict(wrapped, config.distributed),
                "optimizer": distributed.optimizer_state_dict(wrapped, optimizer, config.distributed),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "rng": rng_state(generator),
                "step": step,
                "data_position": (epoch, batch_index),
                "config": to_dict(config),
            }
            if world.is_main:
                save_checkpoint(out, state, model, ema, config)
            distributed.barrier(world)
    bar.close()
    if world.is_main:
        plot_loss(out / "loss.jsonl", out / "loss.png")
    # "model" is the trained module itself (this rank's copy), for callers in the same process.
    return {"step": step, "loss": last_loss, "seconds": time.time() - started, "output_dir": str(out), "model": model}


def _maybe_no_sync(wrapped, sync: bool):
    import contextlib

    return contextlib.nullcontext() if sync or not hasattr(wrapped, "no_sync") else wrapped.no_sync()


def _progress_bar(config: DiTTrainConfig, world, step: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=step, desc="train dit", unit="step", dynamic_ncols=True,
                disable=not (config.progress and world.is_main))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint being resumed (they will be recomputed)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))


def save_checkpoint(out: Path, state: dict, model: SanaDiT, ema: EMA | None, config: DiTTrainConfig) -> None:
    """Resumable state under checkpoints/, plus weights sana.load_dit (or sana.load_lora) reads directly."""
    step = state["step"]
    folder = out / "checkpoints" / f"step_{step:07d}"
    write_torch(folder / "state.pt", state)
    write_json(out / "checkpoints" / "latest.json", {"name": folder.name, "step": step})
    kept = sorted(p for p in (out / "checkpoints").glob("step_*") if p.is_dir())
    for stale in kept[: -config.keep_checkpoints] if config.keep_checkpoints > 0 else []:
        import shutil

        shutil.rmtree(stale, ignore_errors=True)
    if distributed.is_sharded(model):  # FSDP shards: export from the whole weights gathered in `state`
        model = SanaDiT(model.config)
        model.load_state_dict(state["model"])
    export_weights(out, model, state["ema"]["shadow"] if state["ema"] is not None else None, config)
    plot_loss(out / "loss.jsonl", out / "loss.png")


def export_weights(out: Path, model: SanaDiT, ema_weights: dict[str, torch.Tensor] | None, config: DiTTrainConfig) -> None:
    """`transformer/` (raw) and `transformer_ema/` as diffusers folders, or `lora.safetensors` (+ `_ema`).

    `model` holds whole (unsharded) weights; `ema_weights` are the EMA's whole tensors, if any."""
    if config.lora_rank:
        from sana.lora import save_lora

        save_lora(model, out / "lora.safetensors")
        if ema_weights is not None:
            with _swapped(model, ema_weights):
                save_lora(model, out / "lora_ema.safetensors")
        return
    save_dit(model, out / "transformer")
    if ema_weights is not None:
        with _swapped(model, ema_weights):
            save_dit(model, out / "transformer_ema")


class _swapped:
    """Temporarily load `weights` (a name → tensor subset) into `model`."""

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


def write_samples(model: SanaDiT, ema: EMA | None, cache: LatentCache, config: DiTTrainConfig, path: Path,
                  write: bool = True) -> None:
    """A grid of the cached sample prompts, generated with the EMA weights when there are some.
    `write=False` runs the sampling only (a non-main rank taking part in sharded forward passes)."""
    if not config.vae or not cache.sample_texts:
        return
    from sana.dcae_io import load_dcae

    from .sampling import decode_latents, sample_latents

    size = cache.latent_size(0)
    with _swapped(model, ema.shadow if ema is not None else {}):
        latents = sample_latents(model, cache.sample_texts, cache.null_text, size, steps=config.sample_steps,
                                 guidance_scale=config.sample_guidance, seed=config.seed)
    if not write:
        return
    dcae = load_dcae(config.vae, dtype=torch.float32)  # loaded only for the grid, then freed
    images = to_uint8(decode_latents(dcae, latents))
    del dcae
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cache.sample_prompts, scale=max(1, 128 // images[0].shape[0])).save(path)
