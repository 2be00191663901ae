"""Training a SANA ControlNet on a frozen DiT (`python -m trainer controlnet`): the DiT trainer's
loop (`trainer.train_dit.run_training`: resume, DDP/FSDP, EMA, non-finite-step skipping,
logging, sample grids) with a `Trainee` that trains `ControlledDiT`.

The model: --init's DiT, frozen, steered by a `sana.controlnet.SanaControlNet` made by
`SanaControlNet.from_dit` (a copy of the DiT's first blocks whose zero projections make it a
no-op at the start) or read from --controlnet. The forward pass is the ControlNet's residuals
given the sample's control latents (the control image through the DC-AE, as cached), added into
the DiT's blocks (`block_residuals`); the loss is the DiT's flow-matching loss. The checkpoint
keeps the ControlNet's weights only (the DiT is --init's), and the exports are
`controlnet.safetensors` and `controlnet_ema.safetensors`, diffusers-layout single files that
`sana.load_controlnet` and ComfyUI's Sana ControlNet Loader read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sana.controlnet import RELEASED_CONTROL_BLOCKS, SanaControlNet, check_controlnet_fits
from sana.controlnet_io import load_controlnet, save_controlnet
from sana.dit_io import load_dit
from sana.errors import SanaInputError

from .cache import LatentCache
from .controlnet_config import ControlNetTrainConfig, check_cache_has_control, check_config
from .dit_step import WEIGHT_DTYPES, Parts, assemble_parts
from .train_dit import SampleSet, Trainee, run_training, square_latent

EXPORTS = ("controlnet.safetensors", "controlnet_ema.safetensors")
SAMPLE_COUNT = 4  # cached samples shown in each sample grid


class ControlledDiT(nn.Module):
    """A frozen DiT steered by a trainable ControlNet: `forward(x, timestep, context,
    context_mask=None, control=...)` is the DiT's velocity with the ControlNet's residuals for
    the control latents `control` [B, c, h, w]."""

    def __init__(self, dit: nn.Module, controlnet: SanaControlNet):
        super().__init__()
        self.dit = dit.requires_grad_(False)
        self.controlnet = controlnet

    @property
    def config(self):
        """The DiT's config (its latent size and flow shift are the run's)."""
        return self.dit.config

    @property
    def device(self) -> torch.device:
        return self.dit.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block, the unit of FSDP's sharding (`distributed.wrap_model`)."""
        return [*self.dit.blocks, *self.controlnet.blocks]

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.dit.enable_gradient_checkpointing(enabled)
        self.controlnet.enable_gradient_checkpointing(enabled)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                control: torch.Tensor | None = None) -> torch.Tensor:
        if control is None:
            raise SanaInputError("ControlledDiT: give the control latents (control=)")
        residuals = self.controlnet(x, timestep, context, control, context_mask)
        return self.dit(x, timestep, context, context_mask, block_residuals=residuals)


def build_controlled_dit(config: ControlNetTrainConfig, cache: LatentCache) -> ControlledDiT:
    """--init's DiT (fp32, on the CPU) with --controlnet's ControlNet, or a new one from the DiT."""
    dit = load_dit(config.init, dtype=torch.float32)
    for field, cached, what in (("in_channels", cache.latent_channels, "latent channels"),
                                ("caption_channels", cache.text_dim, "caption embedding width")):
        if getattr(dit.config, field) != cached:
            raise SanaInputError(f"--init {config.init}: its {field} is {getattr(dit.config, field)}, the cache {config.cache_dir}'s "
                                 f"{what} {cached}: build the cache with the DiT's DC-AE and text encoder")
    if config.controlnet:
        controlnet = load_controlnet(config.controlnet, dtype=torch.float32)
        check_controlnet_fits(controlnet, dit)
    else:
        blocks = config.controlnet_blocks or min(RELEASED_CONTROL_BLOCKS, dit.config.depth - 1)
        if blocks >= dit.config.depth:
            raise SanaInputError(f"--controlnet-blocks {blocks}: the DiT {config.init} has {dit.config.depth} blocks; "
                                 f"give at most {dit.config.depth - 1} (the last residual goes after DiT block N)")
        controlnet = SanaControlNet.from_dit(dit, blocks=blocks)
    return ControlledDiT(dit, controlnet)


def build_parts(config: ControlNetTrainConfig, cache: LatentCache, world) -> Parts:
    """The controlled DiT on the device in --weights-dtype, only the ControlNet trained."""
    model = build_controlled_dit(config, cache).to(world.device, WEIGHT_DTYPES[config.weights_dtype]).train()
    model.enable_gradient_checkpointing(config.grad_checkpointing)
    return assemble_parts(model, config, world, partial=True, control=True)


def sample_set(config: ControlNetTrainConfig, cache: LatentCache) -> SampleSet | None:
    """The first cached samples of the square latent size, with their captions and control latents."""
    if not config.sample_every:
        return None
    size = square_latent(cache)
    chosen = [i for i in range(len(cache)) if cache.latent_size(i) == size][:SAMPLE_COUNT]
    return SampleSet(prompts=[cache.meta[i]["caption"] for i in chosen], texts=[cache[i][1] for i in chosen],
                     null_text=cache.null_text, controls=torch.stack([cache.control(i).float() for i in chosen]))


def export_controlnet(out: Path, state: dict, model: ControlledDiT, config: ControlNetTrainConfig) -> None:
    """`EXPORTS`: the ControlNet's raw and EMA weights from the checkpoint's whole tensors."""
    weights = {"controlnet.safetensors": state["model"]}
    if state["ema"] is not None:
        weights["controlnet_ema.safetensors"] = state["ema"]["shadow"]
    for name, tensors in weights.items():
        controlnet = SanaControlNet(model.controlnet.config)
        controlnet.load_state_dict({key.removeprefix("controlnet."): value for key, value in tensors.items()
                                    if key.startswith("controlnet.")})
        save_controlnet(controlnet.to(next(iter(tensors.values())).dtype), out / name)


CONTROLNET = Trainee(name="controlnet", check_config=check_config, check_cache=check_cache_has_control, build_parts=build_parts,
                     sample_set=sample_set, export=export_controlnet, exports=EXPORTS)


def train_controlnet(config: ControlNetTrainConfig) -> dict:
    """Train a ControlNet (see the module docstring); returns `train_dit`'s summary, whose
    `model` is the `ControlledDiT`. Raises as `train_dit` does, and `SanaInputError` for a
    cache without control images."""
    return run_training(config, CONTROLNET)


__all__ = ["ControlNetTrainConfig", "ControlledDiT", "EXPORTS", "train_controlnet"]
