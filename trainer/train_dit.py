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

Safety: every option is checked before anything is loaded (`check_config`); one run at a time
holds the output folder (`run_folder.run_lock`); resume reads checkpoints of this run folder
only, without running code, falling back past broken ones (`run_folder.find_resumable`) and
refusing changed options that would change the run's meaning. A step whose loss or gradients
are non-finite updates nothing (all ranks agree to skip it); after `max_nan_losses` of them, or
an update that makes the weights non-finite, training stops with `SanaNonFiniteError` and the
last good checkpoint stays: nothing non-finite is saved, exported or allowed to prune.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sana.checkpoint import write_json
from sana.dit import DIT_PRESETS, SanaDiT, SanaDiTConfig
from sana.dit_io import load_dit, save_dit
from sana.errors import SanaCheckpointError, SanaInputError, SanaNonFiniteError

from . import distributed
from .data import BucketBatches, LatentCache, pad_texts
from .options import check_range, check_types, flag, invalid, option, to_dict
from .plotting import image_grid, plot_loss, to_uint8
from .run_folder import (
    CHECKPOINTS,
    Resumable,
    checkpoint_name,
    find_resumable,
    prune_checkpoints,
    refuse_fresh_start,
    run_lock,
    save_state,
    truncate_log,
)


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
    betas: list[float] = option([0.9, 0.999], "Adam betas, two values in [0, 1) (CAME: three; the default gives CAME's own)")
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
    keep_checkpoints: int = option(2, "resumable checkpoints kept on disk (0: all)")
    sample_every: int = option(0, "steps between sample grids (0 disables; needs --vae and cached sample prompts)")
    sample_steps: int = option(20, "Flow-DPM-Solver steps for sample grids")
    sample_guidance: float = option(4.5, "CFG scale for sample grids")
    lora_rank: int = option(0, "train a LoRA of this rank instead of the full model (0: full fine-tune)")
    lora_alpha: float = option(0.0, "LoRA alpha (0: equal to the rank)")
    lora_targets: list[str] = option(["to_q", "to_k", "to_v"], "LoRA target layers, diffusers module names or suffixes (to_q, to_out.0, attn2.to_k, conv_inverted, ...)")
    distributed: str = option("ddp", "multi-process strategy under torchrun", choices=["ddp", "fsdp"])
    device: str = option("auto", "cpu, cuda, cuda:N, mps or auto")
    resume: bool = option(True, "continue from the latest checkpoint in output_dir if there is one")
    progress: bool = option(True, "show a progress bar")
    max_nan_losses: int = option(20, "stop after this many steps with a non-finite loss or gradient (each is skipped)")


DEFAULT_BETAS = [0.9, 0.999]
MAX_SEED = 2**32 - 1


def check_config(config: DiTTrainConfig) -> None:
    """Raise `SanaInputError` naming the first unusable option; reads no file but stats paths."""
    check_types(config)
    if not config.output_dir:
        raise invalid("output_dir", config.output_dir, "give the run folder")
    if not config.cache_dir:
        raise invalid("cache_dir", config.cache_dir, "give the latent cache folder built by `python -m trainer cache`")
    _check_model_source(config)
    if config.vae and not Path(config.vae).exists():
        raise invalid("vae", config.vae, "no such file or folder")
    for name in ("steps", "batch_size", "grad_accum", "log_every", "sample_steps", "max_nan_losses"):
        check_range(config, name, at_least=1)
    for name in ("warmup_steps", "save_every", "keep_checkpoints", "sample_every", "lora_rank"):
        check_range(config, name, at_least=0)
    for name in ("weight_decay", "grad_clip", "flow_shift", "sample_guidance", "lora_alpha"):
        check_range(config, name, at_least=0.0)
    for name in ("lr", "eps", "logit_std"):
        check_range(config, name, above=0.0)
    check_range(config, "ema_decay", at_least=0.0, below=1.0)
    check_range(config, "caption_dropout", at_least=0.0, at_most=1.0)
    check_range(config, "seed", at_least=0, at_most=MAX_SEED)
    _check_optimizer(config)
    if config.lora_rank and not config.lora_targets:
        raise invalid("lora_targets", config.lora_targets, "give at least one target layer for the LoRA")
    if config.lora_rank and config.distributed == "fsdp":
        raise SanaInputError("--lora-rank with --distributed fsdp: LoRA training runs with --distributed ddp; "
                             "fsdp is for full fine-tunes of models that do not fit one GPU")
    distributed.check_device(config.device)


def _check_model_source(config: DiTTrainConfig) -> None:
    if bool(config.init) == bool(config.model):
        raise SanaInputError("give either --init (a checkpoint to fine-tune) or --model (a DIT_PRESETS name or a "
                             f"JSON SanaDiTConfig file to train from scratch); got --init {config.init!r} --model {config.model!r}")
    if config.init and not Path(config.init).exists():
        raise invalid("init", config.init, "no such file or folder")
    if config.model and config.model not in DIT_PRESETS and not Path(config.model).is_file():
        raise invalid("model", config.model, f"neither a DIT_PRESETS name ({sorted(DIT_PRESETS)}) nor a JSON file")


def _check_optimizer(config: DiTTrainConfig) -> None:
    betas = list(config.betas)
    wanted = 3 if config.optimizer == "came" and betas != DEFAULT_BETAS else 2
    if len(betas) != wanted or not all(0.0 <= b < 1.0 for b in betas):
        raise invalid("betas", betas, f"expected {wanted} values in [0, 1) for --optimizer {config.optimizer}")
    if config.optimizer == "came":
        try:
            import came_pytorch  # noqa: F401
        except ImportError:
            raise invalid("optimizer", "came", "needs the came_pytorch package (pip install came-pytorch)") from None


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
        from came_pytorch import CAME  # present: check_config made sure

        betas = tuple(config.betas) if len(config.betas) == 3 else (0.9, 0.999, 0.9999)
        return CAME(params, lr=config.lr, weight_decay=config.weight_decay, betas=betas, eps=(1e-30, 1e-16))
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas[:2]), eps=config.eps, weight_decay=config.weight_decay)


def build_model(config: DiTTrainConfig, cache: LatentCache) -> SanaDiT:
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


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG state, as tensors and plain data: `state.pt` then loads with weights_only."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    """Restore `rng_state`'s output; also the tuples that earlier versions stored as they were."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    python_state = state["python"]
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"])
    random.setstate(python_state)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_dit(config: DiTTrainConfig) -> dict:
    """Train; returns a summary (final loss, steps, skipped steps, seconds, output folder) and the
    trained `model`.

    Raises `SanaInputError` for an unusable option (before anything is loaded),
    `SanaCheckpointError` for an unusable file or run folder (another run holds it, or it saved
    checkpoints of which none is intact), `SanaNonFiniteError` when training goes non-finite
    (nothing non-finite is saved; the last good checkpoint stays)."""
    check_config(config)
    world = distributed.init_world(config.device)
    micro = _micro_batch_size(config, world)
    out = Path(config.output_dir)
    with run_lock(out, take=world.is_main):
        return _train(config, world, micro, out)


def _train(config: DiTTrainConfig, world, micro: int, out: Path) -> dict:
    say = _reporter(world)
    resumable = _resumable(config, out, say)
    if world.is_main:
        write_json(out / "train_config.json", to_dict(config))
    cache = LatentCache(config.cache_dir)
    # Built before the model, so a batch size the cache cannot fill fails before any real work.
    sampler = BucketBatches([cache.latent_size(i) for i in range(len(cache))], config.batch_size, config.seed)
    parts = _build_parts(config, cache, world)
    model, ema = parts.model, parts.ema
    autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]
    shift = config.flow_shift or model.config.flow_shift

    step, epoch, batch_index, non_finite = 0, 0, 0, 0
    last_good = None  # the newest checkpoint, named when training stops on non-finite values
    if resumable is not None:
        step, (epoch, batch_index), non_finite = parts.restore(resumable.state, config)
        last_good, resumable = resumable.path, None  # frees the loaded state
        say(f"resumed from {last_good} at step {step}")
    if world.is_main:
        truncate_log(out / "loss.jsonl", step, say)

    batches = sampler.iterate(epoch, batch_index)
    bar = _progress_bar(config, world, step)
    skipped, started, last_loss = 0, time.time(), float("nan")
    while step < config.steps:
        epoch, batch_index, indices = next(batches)
        loss_value, grad_norm = _forward_backward(parts, cache, indices, config, world, micro, autocast_dtype, shift)
        problem = _skip_reason(loss_value, grad_norm, parts.scaler, world)
        if problem is None:
            parts.optimizer_step()
            if not distributed.all_ranks_agree(_all_finite(parts.trained.values()), world):
                raise SanaNonFiniteError(
                    f"training: the optimizer update of step {step + 1} made the weights non-finite although its loss and "
                    f"gradients were finite (--lr {config.lr}, --eps {config.eps}?); nothing of it was saved, "
                    f"the last good checkpoint is {last_good or 'none (none was saved yet)'}"
                )
            if ema is not None:
                ema.update(parts.trained)
            last_loss = loss_value
        else:
            parts.skip_step()
            skipped += 1
            non_finite += problem != FP16_OVERFLOW
        step += 1
        batch_index += 1

        if world.is_main:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{parts.scheduler.get_last_lr()[0]:.2e}")
            if problem is not None:
                say(f"warning: step {step}: {problem}; step skipped (weights, optimizer, EMA and LR schedule unchanged; "
                    f"{non_finite} of --max-nan-losses {config.max_nan_losses} non-finite steps)")
            if problem is not None or step % config.log_every == 0 or step == config.steps:
                row = {"step": step, "loss": _finite_or_none(loss_value), "lr": parts.scheduler.get_last_lr()[0],
                       "grad_norm": _finite_or_none(grad_norm), "epoch": epoch, "seconds": round(time.time() - started, 3)}
                _append_log_row(out / "loss.jsonl", row if problem is None else {**row, "skipped": problem})
        if problem not in (None, FP16_OVERFLOW) and non_finite >= config.max_nan_losses:
            bar.close()
            raise SanaNonFiniteError(
                f"training loss: {non_finite} steps with a non-finite loss or gradient (--max-nan-losses "
                f"{config.max_nan_losses}), the last at step {step}; they did not update the weights, and the last good "
                f"checkpoint is {last_good or 'none (none was saved yet)'}. Lower --lr, keep --grad-clip on, or check the data"
            )
        # Sharded weights need every rank in the forward passes; only the main rank writes the grid.
        if config.sample_every and step % config.sample_every == 0 and (world.is_main or distributed.is_sharded(model)):
            write_samples(model, ema, cache, config, out / "samples" / f"step_{step:07d}.png", write=world.is_main)
        if (config.save_every and step % config.save_every == 0) or step == config.steps:
            if not distributed.all_ranks_agree(parts.finite(), world):  # never true: each update is checked above
                raise SanaNonFiniteError(f"training: the weights at step {step} are non-finite; not saved")
            state = parts.capture(config, step, (epoch, batch_index), non_finite)
            if world.is_main:
                save_checkpoint(out, state, model, ema, config)
            last_good = out / CHECKPOINTS / checkpoint_name(step)
            distributed.barrier(world)
    bar.close()
    if world.is_main:
        plot_loss(out / "loss.jsonl", out / "loss.png")
    # "model" is the trained module itself (this rank's copy), for callers in the same process.
    return {"step": step, "loss": last_loss, "skipped_steps": skipped, "seconds": time.time() - started,
            "output_dir": str(out), "model": model}


@dataclass
class _Parts:
    """The model and everything a checkpoint saves and restores with it."""

    model: SanaDiT
    wrapped: torch.nn.Module  # what runs the forward pass: the model, or its DDP/FSDP wrapper
    trained: dict[str, torch.Tensor]  # the parameters that train (FSDP: this rank's shards)
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # every random draw of a step

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
        return _all_finite([*self.trained.values(), *(self.ema.shadow.values() if self.ema is not None else [])])

    def capture(self, config: DiTTrainConfig, step: int, data_position: tuple[int, int], non_finite: int) -> dict:
        """The resumable state, with whole tensors (a collective under FSDP: every rank calls it)."""
        strategy = config.distributed
        return {
            "model": distributed.full_state_dict(self.wrapped, strategy),
            "optimizer": distributed.optimizer_state_dict(self.wrapped, self.optimizer, strategy),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(self.generator),
            "step": step,
            "data_position": data_position,
            "non_finite_steps": non_finite,
            "config": to_dict(config),
        }

    def restore(self, state: dict, config: DiTTrainConfig) -> tuple[int, tuple[int, int], int]:
        """Load `capture`'s state; returns its (step, data position, non-finite steps so far)."""
        distributed.load_full_state_dict(self.wrapped, config.distributed, state["model"])
        distributed.load_optimizer_state_dict(self.wrapped, self.optimizer, config.distributed, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"], like=self.trained)
        set_rng_state(self.generator, state["rng"])
        epoch, batch_index = state["data_position"]
        return state["step"], (epoch, batch_index), state.get("non_finite_steps", 0)


def _build_parts(config: DiTTrainConfig, cache: LatentCache, world) -> _Parts:
    model = build_model(config, cache).float().to(world.device).train()
    model.enable_gradient_checkpointing(config.grad_checkpointing)
    if config.lora_rank:
        from sana.lora import inject_lora

        model.requires_grad_(False)
        inject_lora(model, rank=config.lora_rank, alpha=config.lora_alpha or config.lora_rank, targets=config.lora_targets, seed=config.seed)
    wrapped = distributed.wrap_model(model, world, config.distributed)
    # FSDP replaces the parameters by their shards: take them, and the EMA's copies, after wrapping.
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(list(trained.values()), config)
    warmup = config.warmup_steps
    return _Parts(
        model=model,
        wrapped=wrapped,
        trained=trained,
        ema=EMA(trained, config.ema_decay) if config.ema_decay > 0 else None,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0),
        scaler=torch.amp.GradScaler(world.device.type, enabled=config.mixed_precision == "fp16"),
        generator=torch.Generator().manual_seed(config.seed),
    )


def _forward_backward(parts: _Parts, cache: LatentCache, indices: list[int], config: DiTTrainConfig, world, micro: int,
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
    latents = torch.stack([latent.float() for latent, _ in items])

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
            )
            parts.scaler.scale(loss / config.grad_accum).backward()
        total_loss += loss.detach() / config.grad_accum
    parts.scaler.unscale_(parts.optimizer)
    # Clipping at infinity measures the norm and leaves the gradients as they are (× 1.0).
    # Under FSDP the norm is a DTensor; make it whole here, where every rank runs.
    clip = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(parts.trained.values(), clip)))
    return float(distributed.all_reduce_mean(total_loss, world)), grad_norm


def _append_log_row(path: Path, row: dict) -> None:
    with open(path, "a") as log:
        log.write(json.dumps(row) + "\n")


FP16_OVERFLOW = "fp16 gradient overflow (the loss scale is lowered)"


def _skip_reason(loss: float, grad_norm: float, scaler: torch.amp.GradScaler, world) -> str | None:
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


def _all_finite(tensors) -> bool:
    """Whether every floating-point tensor (this rank's shard of a DTensor) holds finite values."""
    floats = [distributed.local_tensor(t) for t in tensors]
    floats = [t.detach() for t in floats if t.is_floating_point() and t.numel()]
    return not floats or bool(torch.stack([t.isfinite().all() for t in floats]).all())


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: such values are logged as null."""
    return value if math.isfinite(value) else None


def _reporter(world):
    """Messages for the person running training: printed to stderr by the main rank only."""
    if not world.is_main:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _micro_batch_size(config: DiTTrainConfig, world) -> int:
    per_step = world.size * config.grad_accum
    if config.batch_size % per_step:
        raise SanaInputError(
            f"--batch-size {config.batch_size}: not divisible by processes × --grad-accum = {world.size} × {config.grad_accum}"
        )
    return config.batch_size // per_step


EXPORTS = ("transformer", "transformer_ema", "lora.safetensors", "lora_ema.safetensors")  # export_weights' outputs


def _resumable(config: DiTTrainConfig, out: Path, say) -> Resumable | None:
    """The checkpoint this run continues from (its options checked against the ones given now), or
    None for a fresh start, which must not overwrite an earlier run's checkpoints or exports."""
    if config.resume:
        resumable = find_resumable(out, say)
    else:
        refuse_fresh_start(out)
        resumable = None
    if resumable is not None:
        check_resume_options(resumable.state["config"], config, resumable.path, say)
        return resumable
    exported = [name for name in EXPORTS if (out / name).exists()]
    if exported:  # checkpoints are written before the exports: these were deleted
        raise SanaCheckpointError(
            f"{out} holds exported weights of an earlier run ({', '.join(exported)}) but no checkpoint to resume; "
            "starting over would overwrite them: give another --output-dir to start a new run"
        )
    return None


# Options a resumed run may change: how long it runs, how it logs, saves and samples, and the
# hardware it uses. Every other option changes what the checkpoint's weights, optimizer state
# or data order mean (a resumed optimizer would even silently keep the old learning rate), so a
# change to one of them is refused.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "steps", "log_every", "save_every", "keep_checkpoints", "sample_every", "sample_steps",
    "sample_guidance", "vae", "grad_accum", "grad_checkpointing", "distributed", "device", "resume", "progress",
    "max_nan_losses",
})


def check_resume_options(saved: dict, config: DiTTrainConfig, checkpoint: Path, say) -> None:
    """Refuse (`SanaInputError`, naming each option with both values) a resume whose options
    change the run's meaning; report the harmless changes."""
    current = to_dict(config)
    refused, noted = [], []
    for name, before in saved.items():
        now = current.get(name, before)
        if _plain(before) == _plain(now):
            continue
        change = f"{flag(name)} {before!r} (checkpoint) → {now!r} (now)"
        (noted if name in RESUMABLE_CHANGES else refused).append(change)
    if refused:
        raise SanaInputError(
            f"cannot resume {checkpoint} with other options: {'; '.join(refused)}. They change what the checkpoint "
            "means: give the checkpoint's values, or start a new run in another --output-dir"
        )
    if noted:
        say(f"resuming {checkpoint} with: {'; '.join(noted)}")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _maybe_no_sync(wrapped, sync: bool):
    import contextlib

    return contextlib.nullcontext() if sync or not hasattr(wrapped, "no_sync") else wrapped.no_sync()


def _progress_bar(config: DiTTrainConfig, world, step: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=step, desc="train dit", unit="step", dynamic_ncols=True,
                disable=not (config.progress and world.is_main))


def save_checkpoint(out: Path, state: dict, model: SanaDiT, ema: EMA | None, config: DiTTrainConfig) -> None:
    """Resumable state under checkpoints/, plus weights sana.load_dit (or sana.load_lora) reads
    directly; older checkpoints are pruned only once both are written. `state` holds finite
    weights (checked by the caller on every rank)."""
    save_state(out, state)
    if distributed.is_sharded(model):  # FSDP shards: export from the whole weights gathered in `state`
        model = SanaDiT(model.config)
        model.load_state_dict(state["model"])
    export_weights(out, model, state["ema"]["shadow"] if state["ema"] is not None else None, config)
    prune_checkpoints(out, config.keep_checkpoints, state["step"])
    plot_loss(out / "loss.jsonl", out / "loss.png")


def export_weights(out: Path, model: SanaDiT, ema_weights: dict[str, torch.Tensor] | None, config: DiTTrainConfig) -> None:
    """`transformer/` (raw) and `transformer_ema/` as diffusers folders, or `lora.safetensors` (+ `_ema`): `EXPORTS`.

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
