"""DC-AE training for small autoencoders (docs: dcae_spec.md §5).

Phase 1 of the recipe (low-resolution full training, reconstruction loss) is what a small
autoencoder needs: L1 + MSE on pixels in [-1, 1] (LPIPS and the phase-3 GAN need pretrained
networks that cannot be downloaded here; `phase="decoder-head"` trains only the decoder's
output side, with the latent space frozen, as phase 3 does; `phase="decoder"` trains the whole
decoder with the encoder frozen, which sharpens a small model's edges without moving the
latents a DiT was trained on). AdamW with the paper's phase-1
settings scaled for tiny models, warm-up, gradient clipping. After training from scratch, the
scaling factor is set to 1 / RMS of the latents over the data (the spec's rule); a fine-tune of
--init keeps its factor unless `--scaling-factor recompute` (a DiT trained on the old latents
would no longer match). The model is saved with `sana.dcae_io.save_dcae`, so `load_dcae` reads it back.

Every option is checked before anything is loaded (`check_config`), one run at a time holds the
output folder, and a non-finite loss stops training (`SanaNonFiniteError` naming the step)
before anything is saved.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sana.checkpoint import write_json
from sana.dcae import DCAE, DCAEConfig, latent_rms_scaling_factor
from sana.dcae_io import load_dcae, save_dcae
from sana.errors import SanaCheckpointError, SanaInputError, SanaNonFiniteError

from . import distributed
from .options import check_range, check_types, invalid, option, to_dict
from .run_folder import run_lock


@dataclass
class DCAETrainConfig:
    """Reconstruction training (L1 + MSE) of a small DC-AE from scratch (--config-json) or from a
    checkpoint (--init), on an image folder or JSONL manifest (--data)."""

    output_dir: str = option("runs/dcae", "where the trained DC-AE (diffusers folder `vae/`) and its log go")
    data: str = option("", "image folder or JSONL manifest (captions are ignored)")
    init: str = option("", "DC-AE checkpoint to continue from (anything load_dcae reads); empty: --config-json")
    config_json: str = option("", "DCAEConfig JSON (sana.dcae.DCAEConfig.to_json) when training from scratch")
    resolution: int = option(64, "square training crop side (a multiple of the compression)")
    phase: str = option("full", "full: whole model (phase 1); decoder: whole decoder, encoder frozen; decoder-head: decoder output side only (phase 3)", choices=["full", "decoder", "decoder-head"])
    steps: int = option(1000, "optimizer steps")
    batch_size: int = option(32, "images per step")
    lr: float = option(2e-3, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(50, "linear warm-up steps")
    grad_clip: float = option(1.0, "max gradient norm (0 disables)")
    l1_weight: float = option(1.0, "weight of the L1 reconstruction loss")
    mse_weight: float = option(1.0, "weight of the MSE reconstruction loss")
    salient_weight: float = option(0.0, "extra per-pixel weight ∝ |pixel − image mean|: small objects on a plain background are not averaged away")
    scaling_factor: str = option("auto", "the saved latent scaling factor: recompute (1 / RMS of the latents), keep --init's, or "
                                 "auto (recompute from scratch, keep --init's: a DiT trained on its latents depends on it)",
                                 choices=["auto", "recompute", "keep"])
    seed: int = option(0, "seed for initialisation and data order")
    log_every: int = option(10, "steps between loss-log rows")
    threads: int = option(0, "CPU threads (0: the CPUs this process may use)")
    progress: bool = option(True, "show a progress bar")


def check_config(config: DCAETrainConfig, *, has_images: bool = False) -> None:
    """Raise `SanaInputError` naming the first unusable option (`has_images`: the caller supplies
    the batches, so `data` is not needed); reads no file but stats paths."""
    check_values(config)
    if not config.output_dir:
        raise invalid("output_dir", config.output_dir, "give the output folder")
    if bool(config.init) == bool(config.config_json):
        raise SanaInputError("give either --init (a DC-AE checkpoint to continue from) or --config-json (a DCAEConfig "
                             f"JSON file to train from scratch); got --init {config.init!r} --config-json {config.config_json!r}")
    for name in ("init", "config_json"):
        if getattr(config, name) and not Path(getattr(config, name)).exists():
            raise invalid(name, getattr(config, name), "no such file or folder")
    if not has_images:
        if not config.data:
            raise invalid("data", config.data, "give an image folder or JSONL manifest")
        if not Path(config.data).exists():
            raise invalid("data", config.data, "no such file or folder")


def check_values(config: DCAETrainConfig) -> None:
    """The checks of `check_config` that read no file: types and ranges."""
    check_types(config)
    for name in ("resolution", "steps", "batch_size", "log_every"):
        check_range(config, name, at_least=1)
    check_range(config, "warmup_steps", at_least=0)
    for name in ("weight_decay", "grad_clip", "l1_weight", "mse_weight", "salient_weight"):
        check_range(config, name, at_least=0.0)
    check_range(config, "lr", above=0.0)
    check_range(config, "seed", at_least=0, at_most=2**32 - 1)
    check_range(config, "threads", at_least=0)
    if config.scaling_factor == "keep" and not config.init:
        raise invalid("scaling_factor", "keep", "there is no --init to keep it from: training from scratch computes it")
    if config.l1_weight == 0 and config.mse_weight == 0:
        raise SanaInputError("--l1-weight 0 and --mse-weight 0: the loss would be zero; give one a positive weight")


def decoder_head_parameters(model: DCAE) -> list[torch.nn.Parameter]:
    """Phase 3's trainable set: the decoder's shallowest non-empty stage and its output layers."""
    stages = [s for s in model.decoder.up_blocks if len(s)]
    return [*stages[0].parameters(), *model.decoder.norm_out.parameters(), *model.decoder.conv_out.parameters()]


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, config: DCAETrainConfig) -> torch.Tensor:
    error = recon - target
    per_pixel = config.l1_weight * error.abs() + config.mse_weight * error.square()
    if config.salient_weight:
        salience = (target - target.mean(dim=(2, 3), keepdim=True)).abs().mean(dim=1, keepdim=True)
        per_pixel = per_pixel * (1 + config.salient_weight * salience)
    return per_pixel.mean()


def train_dcae(config: DCAETrainConfig, images: Callable[[np.random.Generator, int], torch.Tensor] | None = None) -> dict:
    """Train; `images(rng, n)` may supply [n, 3, R, R] batches in [-1, 1] instead of `data`.

    Raises `SanaInputError` for an unusable option (before anything is loaded),
    `SanaCheckpointError` for an unusable file or a folder another run holds, and
    `SanaNonFiniteError` at the first non-finite loss (nothing is saved then)."""
    check_config(config, has_images=images is not None)
    distributed.set_cpu_threads(config.threads)
    out = Path(config.output_dir)
    with run_lock(out):
        return _train(config, images, out)


def _train(config: DCAETrainConfig, images, out: Path) -> dict:
    import json

    from tqdm.auto import tqdm

    write_json(out / "train_config.json", to_dict(config))
    torch.manual_seed(config.seed)
    model = load_dcae(config.init, dtype=torch.float32) if config.init else _model_from_json(Path(config.config_json))
    model.train()
    if images is None:
        if config.resolution % model.spatial_compression:
            raise invalid("resolution", config.resolution, f"must be a multiple of the DC-AE's compression factor {model.spatial_compression}")
        images = _folder_sampler(config)
    if config.phase in ("decoder", "decoder-head"):
        model.requires_grad_(False)
        params = decoder_head_parameters(model) if config.phase == "decoder-head" else list(model.decoder.parameters())
        for p in params:
            p.requires_grad_(True)
    else:
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))
    warmup = max(1, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.5 + 0.5 * math.cos(math.pi * min(1.0, s / config.steps)))
    )
    rng = np.random.default_rng(config.seed)
    started = time.time()
    bar = tqdm(range(config.steps), desc="train dc-ae", unit="step", disable=not config.progress, dynamic_ncols=True)
    log = open(out / "loss.jsonl", "w")
    loss_value = float("nan")
    for step in bar:
        batch = images(rng, config.batch_size)
        recon = model(batch)
        loss = reconstruction_loss(recon, batch, config)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            log.close()
            raise SanaNonFiniteError(f"DC-AE training loss is non-finite at step {step + 1} (--lr {config.lr}?); nothing was saved")
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log.write(json.dumps({"step": step + 1, "loss": loss_value, "seconds": round(time.time() - started, 2)}) + "\n")
            log.flush()
    log.close()
    model.eval()
    if not all(bool(p.isfinite().all()) for p in model.parameters()):
        raise SanaNonFiniteError(f"DC-AE training: the weights are non-finite after {config.steps} steps; nothing was saved")
    if _recompute_scaling(config):
        with torch.no_grad():
            latents = torch.cat([model.encoder(images(rng, config.batch_size)) for _ in range(4)])
        model.config = model.config.replace(scaling_factor=round(latent_rms_scaling_factor(latents), 5))
    elif config.init and config.phase == "full":
        print(f"keeping --init's scaling factor {model.config.scaling_factor} (a DiT trained on its latents depends on it; "
              "--scaling-factor recompute to replace it)", file=sys.stderr)
    save_dcae(model, out / "vae")
    from .plotting import plot_loss

    plot_loss(out / "loss.jsonl", out / "loss.png")
    return {"loss": loss_value, "seconds": time.time() - started, "scaling_factor": model.config.scaling_factor, "path": str(out / "vae")}


def _recompute_scaling(config: DCAETrainConfig) -> bool:
    """Whether training ends by recomputing the scaling factor: only the full phase moves the
    latent space, and a fine-tune of --init keeps its factor unless asked."""
    if config.phase != "full" or config.scaling_factor == "keep":
        return False
    return config.scaling_factor == "recompute" or not config.init


def _model_from_json(path: Path) -> DCAE:
    try:
        config = DCAEConfig.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as error:  # SanaInputError is a ValueError
        raise SanaCheckpointError(f"--config-json {path}: cannot be read as a DCAEConfig: {error}") from None
    return DCAE(config)


def _folder_sampler(config: DCAETrainConfig) -> Callable[[np.random.Generator, int], torch.Tensor]:
    """Random draws of the readable images of `data`, each loaded once as its centred square
    scaled to `resolution` (memory bounded by that side, `data.load_fitted`)."""
    import warnings

    from .data import load_fitted, read_records

    records = read_records(config.data, captions=False)
    square = {"1.0": (config.resolution, config.resolution)}
    loaded = [load_fitted(r.image, square) for r in records]
    pixels = [image for image in loaded if image is not None]
    if not pixels:
        raise SanaCheckpointError(f"--data {config.data}: none of its {len(records)} image(s) can be read")
    if len(pixels) < len(records):
        warnings.warn(f"--data {config.data}: {len(records) - len(pixels)} unreadable image(s) skipped", stacklevel=2)

    def sample(rng: np.random.Generator, n: int) -> torch.Tensor:
        return torch.stack([pixels[int(i)] for i in rng.integers(len(pixels), size=n)])

    return sample
