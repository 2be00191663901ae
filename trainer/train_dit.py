"""Flow-matching training of the SANA DiT (full fine-tune or LoRA) on a latent cache: the loop.

The pieces: `dit_config` (options and their checks), `dit_step` (the model, optimizer, EMA and
one step's gradients), `dit_resume` (where a run starts), `dit_checkpoint` (what it saves and
exports), `sampling` (sample grids), `reporting` (loss.jsonl, TensorBoard, W&B). AdamW (8-bit
with bitsandbytes; stochastic rounding for bf16 weights), or CAME; linear warm-up then constant
LR, gradient clipping, EMA of the trained weights (on the device or the CPU), bf16/fp16
autocast, gradient checkpointing and accumulation; repeats and mirrored images for small
datasets; sample grids of validation prompts encoded at the start.

One loop serves the DiT and a ControlNet on a frozen DiT (`trainer.train_controlnet`): a
`Trainee` says what differs (the options' checks, the module trained, the sample set, the
exported files); the step, resume, distribution, EMA, logging and safety are this module's.

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

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sana.checkpoint import write_json
from sana.errors import SanaInputError, SanaNonFiniteError

from . import distributed
from .cache import LatentCache
from .data import BucketBatches
from .dit_checkpoint import EXPORTS, capture_state, export_dit, restore_state, save_checkpoint
from .dit_config import DiTTrainConfig, check_config
from .dit_resume import find_start
from .dit_step import (
    FP16_OVERFLOW,
    Parts,
    all_finite,
    build_parts,
    flow_matching_loss,
    forward_backward,
    micro_batch_size,
    skip_reason,
    swapped,
)
from .options import to_dict
from .plotting import plot_loss
from .reporting import Reporter
from .run_folder import CHECKPOINTS, checkpoint_name, run_lock, truncate_log

__all__ = ["DiTTrainConfig", "Trainee", "flow_matching_loss", "run_training", "train_dit"]


@dataclass
class SampleSet:
    """What the sample grids show: prompts, their embeddings and the empty prompt's, and for a
    ControlNet each prompt's control latents [B, c, h, w]."""

    prompts: list[str]
    texts: list[torch.Tensor]
    null_text: torch.Tensor
    controls: torch.Tensor | None = None


@dataclass(frozen=True)
class Trainee:
    """What a training run trains, where the DiT's and a ControlNet's runs differ."""

    name: str  # the progress bar's label
    check_config: Callable[[DiTTrainConfig], None]  # refuses unusable options before anything is loaded
    check_cache: Callable[[DiTTrainConfig, LatentCache], None]  # refuses a cache it cannot train on
    build_parts: Callable[[DiTTrainConfig, LatentCache, object], Parts]
    sample_set: Callable[[DiTTrainConfig, LatentCache], SampleSet | None]
    export: Callable[[Path, dict, torch.nn.Module, DiTTrainConfig], None]  # writes the weights other tools read
    exports: tuple[str, ...]  # the names `export` writes in the run folder


def train_dit(config: DiTTrainConfig) -> dict:
    """Train; returns a summary (final loss, steps, skipped steps, seconds, output folder) and the
    trained `model`.

    Raises `SanaInputError` for an unusable option (before anything is loaded),
    `SanaCheckpointError` for an unusable file or run folder (another run holds it, or it saved
    checkpoints of which none is intact), `SanaNonFiniteError` when training goes non-finite
    (nothing non-finite is saved; the last good checkpoint stays)."""
    return run_training(config, DIT)


def run_training(config: DiTTrainConfig, trainee: Trainee) -> dict:
    """`train_dit`'s run for any `Trainee`."""
    trainee.check_config(config)
    distributed.set_cpu_threads(config.threads)
    world = distributed.init_world(config.device, group_of_one=config.distributed == "fsdp")
    micro = micro_batch_size(config, world)
    out = Path(config.output_dir)
    with run_lock(out, take=world.is_main), _only_main_warns(world):
        return _train(config, world, micro, out, trainee)


def _train(config: DiTTrainConfig, world, micro: int, out: Path, trainee: Trainee) -> dict:
    say = _reporter(world)
    resumable = find_start(config, out, say, trainee.exports)
    cache = LatentCache(config.cache_dir)
    trainee.check_cache(config, cache)
    samples = trainee.sample_set(config, cache)
    # Built before the model, so a batch size the cache cannot fill fails before any real work.
    sampler = BucketBatches([cache.latent_size(i) for i in range(len(cache))], config.batch_size, config.seed, config.repeats)
    _report_unusable_buckets(sampler, config, say)
    if world.is_main:
        write_json(out / "train_config.json", to_dict(config))
    parts = trainee.build_parts(config, cache, world)
    model, ema = parts.model, parts.ema
    _check_resolution(config, cache, model, say)
    autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]
    shift = config.flow_shift or model.config.flow_shift

    step, epoch, batch_index, non_finite, seconds_before = 0, 0, 0, 0, 0.0
    last_good = None  # the newest checkpoint, named when training stops on non-finite values
    if resumable is not None:
        step, (epoch, batch_index), non_finite, seconds_before = restore_state(parts, resumable.state, config)
        last_good, resumable = resumable.path, None  # frees the loaded state
        say(f"resumed from {last_good} at step {step}")
    if world.is_main:
        truncate_log(out / "loss.jsonl", step, say)
    reporter = Reporter(out, config.report_to, config=to_dict(config), start_step=step, project=config.wandb_project,
                        enabled=world.is_main)

    batches = sampler.iterate(epoch, batch_index)
    bar = _progress_bar(config, world, step, trainee.name)
    skipped, started, last_loss = 0, time.time() - seconds_before, float("nan")
    try:
        while step < config.steps:
            epoch, batch_index, indices = next(batches)
            loss_value, grad_norm = forward_backward(parts, cache, indices, config, world, micro, autocast_dtype, shift)
            problem = skip_reason(loss_value, grad_norm, parts.scaler, world)
            if problem is None:
                _update(parts, config, world, step, last_good)
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
                reporter.log(step, row if problem is None else {**row, "skipped": problem}, config.batch_size)
            if problem not in (None, FP16_OVERFLOW) and non_finite >= config.max_nan_losses:
                raise SanaNonFiniteError(
                    f"training loss: {non_finite} steps with a non-finite loss or gradient (--max-nan-losses "
                    f"{config.max_nan_losses}), the last at step {step}; they did not update the weights, and the last good "
                    f"checkpoint is {last_good or 'none (none was saved yet)'}. Lower --lr, keep --grad-clip on, or check the data"
                )
            # Sharded weights need every rank in the forward passes; only the main rank writes the grid.
            if config.sample_every and step % config.sample_every == 0 and (world.is_main or distributed.is_sharded(model)):
                write_samples(parts, samples, cache, config, out / "samples" / f"step_{step:07d}.png", reporter, step,
                              write=world.is_main)
            if (config.save_every and step % config.save_every == 0) or step == config.steps:
                _save(parts, config, world, out, step, (epoch, batch_index), non_finite, time.time() - started, trainee)
                last_good = out / CHECKPOINTS / checkpoint_name(step)
    finally:
        bar.close()
        reporter.close()
    if world.is_main:
        plot_loss(out / "loss.jsonl", out / "loss.png")
    # "model" is the trained module itself (this rank's copy), for callers in the same process.
    return {"step": step, "loss": last_loss, "skipped_steps": skipped, "seconds": time.time() - started,
            "output_dir": str(out), "model": model}


def _update(parts: Parts, config: DiTTrainConfig, world, step: int, last_good: Path | None) -> None:
    """Apply a good step's gradients; the EMA follows once the new weights are checked finite."""
    parts.optimizer_step()
    if not distributed.all_ranks_agree(all_finite(parts.trained.values()), world):
        raise SanaNonFiniteError(
            f"training: the optimizer update of step {step + 1} made the weights non-finite although its loss and "
            f"gradients were finite (--lr {config.lr}, --eps {config.eps}?); nothing of it was saved, "
            f"the last good checkpoint is {last_good or 'none (none was saved yet)'}"
        )
    if parts.ema is not None:
        parts.ema.update(parts.trained)


def _save(parts: Parts, config: DiTTrainConfig, world, out: Path, step: int, position: tuple[int, int], non_finite: int,
          seconds: float, trainee: Trainee) -> None:
    """Checkpoint and export step `step` (every rank takes part; the main rank writes)."""
    if not distributed.all_ranks_agree(parts.finite(), world):  # never true: each update is checked
        raise SanaNonFiniteError(f"training: the weights at step {step} are non-finite; not saved")
    state = capture_state(parts, config, step, position, non_finite, seconds)
    if world.is_main:
        save_checkpoint(out, state, parts.model, config, trainee.export)
    distributed.barrier(world)


def _sample_set(config: DiTTrainConfig, cache: LatentCache) -> SampleSet | None:
    """The sample grids' prompts: --validation-prompts, encoded now as the cache's captions were
    (then the encoder is freed), else the cache's sample prompts; None without --sample-every."""
    if not config.sample_every:
        return None
    if config.validation_prompts:
        from sana.text_encoder import load_text_encoder

        settings = cache.summary.get("settings", {})
        dtype = getattr(torch, settings.get("dtype", "float32"))
        encoder = load_text_encoder(config.text_encoder, dtype=dtype, device=distributed.pick_device(config.device))
        embeds, mask = encoder.encode(config.validation_prompts, chi=settings.get("chi", True),
                                      max_length=settings.get("max_length", 300))
        texts = [e[: max(1, int(m.sum()))].cpu().clone() for e, m in zip(embeds, mask)]
        if texts[0].shape[-1] != cache.text_dim:
            raise SanaInputError(f"--text-encoder {config.text_encoder}: its embeddings are {texts[0].shape[-1]} wide, the "
                                 f"cache's {cache.text_dim}: give the text encoder the cache was built with")
        del encoder
        return SampleSet(list(config.validation_prompts), texts, cache.null_text)
    if not cache.sample_prompts:
        raise SanaInputError(f"--sample-every {config.sample_every}: no prompts to sample: give --validation-prompts (with "
                             f"--text-encoder), or build the cache with --sample-prompts")
    return SampleSet(cache.sample_prompts, cache.sample_texts, cache.null_text)


def _report_unusable_buckets(sampler: BucketBatches, config: DiTTrainConfig, say) -> None:
    if sampler.unusable:
        sizes = ", ".join(f"{h}x{w} latents: {n}" for (h, w), n in sampler.unusable.items())
        say(f"warning: {sum(sampler.unusable.values())} cached sample(s) are in aspect-ratio buckets smaller than "
            f"--batch-size {config.batch_size} ({sizes}) and are never trained on: rebuild the cache with "
            f"--min-bucket-size {config.batch_size} (merges them into the nearest bucket), or lower --batch-size")


def _check_resolution(config: DiTTrainConfig, cache: LatentCache, model, say) -> None:
    """Warn when fine-tuning at another resolution than the model was trained at."""
    meta = cache.meta[0]
    if not config.init or "bin" not in meta:
        return
    compression = meta["bin"][0] // meta["size"][0]
    trained_at = model.config.sample_size * compression
    if cache.resolution and cache.resolution != trained_at:
        say(f"warning: the cache was built at --resolution {cache.resolution}, {config.init} was trained at {trained_at}: "
            f"the fine-tune moves it to the cache's resolution (cache it with --dit {config.init} to keep its own)")


class _only_main_warns:
    """Python warnings (data, cache) printed by the main rank only: N ranks would print each N times."""

    def __init__(self, world):
        self.world = world

    def __enter__(self):
        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()
        if not self.world.is_main:
            warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self.catcher.__exit__(*exc)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: such values are logged as null."""
    return value if math.isfinite(value) else None


def _reporter(world):
    """Messages for the person running training: printed to stderr by the main rank only."""
    if not world.is_main:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _progress_bar(config: DiTTrainConfig, world, step: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=step, desc=f"train {name}", unit="step", dynamic_ncols=True,
                disable=not (config.progress and world.is_main))


def write_samples(parts: Parts, samples: SampleSet, cache: LatentCache, config: DiTTrainConfig, path: Path,
                  reporter: Reporter, step: int, write: bool = True) -> None:
    """A grid of the sample prompts, generated with the EMA weights when there are some.
    `write=False` runs the sampling only (a non-main rank taking part in sharded forward passes).
    A grid that comes out non-finite is reported, not fatal: the weights were checked finite."""
    from sana.dcae_io import load_dcae

    from .sampling import sample_latents, write_sample_grid

    model = parts.model
    weights = parts.ema.shadow if parts.ema is not None else {}
    # A ControlNet's run (`trainer.train_controlnet.ControlledDiT`) samples its DiT steered by it.
    dit, control = (model.dit, (model.controlnet, samples.controls)) if samples.controls is not None else (model, None)
    try:
        with swapped(model, weights):
            latents = sample_latents(dit, samples.texts, samples.null_text, square_latent(cache), steps=config.sample_steps,
                                     guidance_scale=config.sample_guidance, seed=config.seed, control=control)
        if not write:
            return
        dcae = load_dcae(config.vae, device=dit.device)  # loaded only for the grid, then freed
        grid = write_sample_grid(dcae, latents, samples.prompts, path, samples.controls)
    except SanaNonFiniteError as error:
        print(f"warning: step {step}: sample grid not written: {error}", file=sys.stderr, flush=True)
        return
    reporter.image(step, "samples", grid)


def square_latent(cache: LatentCache) -> tuple[int, int]:
    """The latent size of the cache's square bin (its resolution), else its first sample's."""
    meta = cache.meta[0]
    if cache.resolution and "bin" in meta:
        side = cache.resolution // (meta["bin"][0] // meta["size"][0])
        return side, side
    return cache.latent_size(0)


def _no_cache_check(config: DiTTrainConfig, cache: LatentCache) -> None:
    """The DiT trains on any cache (--flip's mirrored images are checked at their first use)."""


DIT = Trainee(name="dit", check_config=check_config, check_cache=_no_cache_check, build_parts=build_parts,
              sample_set=_sample_set, export=export_dit, exports=EXPORTS)
