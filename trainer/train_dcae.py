"""DC-AE training for small autoencoders (docs: dcae_spec.md §5).

Phase 1 of the recipe (low-resolution full training, reconstruction loss) is what a small
autoencoder needs: L1 + MSE on pixels in [-1, 1] (LPIPS and the phase-3 GAN need pretrained
networks that cannot be downloaded here; `phase="decoder-head"` trains only the decoder's
output side, with the latent space frozen, as phase 3 does; `phase="decoder"` trains the whole
decoder with the encoder frozen, which sharpens a small model's edges without moving the
latents a DiT was trained on). AdamW with the paper's phase-1
settings scaled for tiny models, warm-up, gradient clipping. After training, the scaling
factor is set to 1 / RMS of the latents over the data (the spec's rule) and the model is
saved with `sana.dcae_io.save_dcae`, so `load_dcae` reads it back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sana.checkpoint import write_json
from sana.dcae import DCAE, DCAEConfig, latent_rms_scaling_factor
from sana.dcae_io import load_dcae, save_dcae

from .options import option, to_dict


@dataclass
class DCAETrainConfig:
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
    seed: int = option(0, "seed for initialisation and data order")
    log_every: int = option(10, "steps between loss-log rows")
    progress: bool = option(True, "show a progress bar")


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
    """Train; `images(rng, n)` may supply [n, 3, R, R] batches in [-1, 1] instead of `data`."""
    import json

    from tqdm.auto import tqdm

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train_config.json", to_dict(config))
    torch.manual_seed(config.seed)
    if config.init:
        model = load_dcae(config.init, dtype=torch.float32)
    else:
        model = DCAE(DCAEConfig.from_json(Path(config.config_json).read_text()))
    model.train()
    if images is None:
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
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log.write(json.dumps({"step": step + 1, "loss": loss_value, "seconds": round(time.time() - started, 2)}) + "\n")
            log.flush()
    log.close()
    model.eval()
    if config.phase == "full":  # the other phases keep the latent space, hence its scaling factor
        with torch.no_grad():
            latents = torch.cat([model.encoder(images(rng, config.batch_size)) for _ in range(4)])
        model.config = model.config.replace(scaling_factor=round(latent_rms_scaling_factor(latents), 5))
    save_dcae(model, out / "vae")
    from .plotting import plot_loss

    plot_loss(out / "loss.jsonl", out / "loss.png")
    return {"loss": loss_value, "seconds": time.time() - started, "scaling_factor": model.config.scaling_factor, "path": str(out / "vae")}


def _folder_sampler(config: DCAETrainConfig) -> Callable[[np.random.Generator, int], torch.Tensor]:
    """Random square crops (scaled to cover `resolution`) from the readable images of `data`."""
    from sana.resolution import resize_and_crop

    from .data import load_image, read_records

    records = read_records(config.data) if config.data else []
    pixels = [img for img in (load_image(r.image) for r in records) if img is not None]
    if not pixels:
        raise SystemExit(f"no readable images in {config.data!r}")
    side = config.resolution

    def sample(rng: np.random.Generator, n: int) -> torch.Tensor:
        chosen = [pixels[int(i)] for i in rng.integers(len(pixels), size=n)]
        tensors = [torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1 for img in chosen]
        return torch.cat([resize_and_crop(t, side, side) for t in tensors]).clamp(-1, 1)

    return sample
