"""The ControlNet trainer's options (`ControlNetTrainConfig`: the DiT trainer's, less those of a
DiT's own weights, plus the ControlNet's) and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sana.errors import SanaInputError

from .dit_config import DiTTrainConfig
from .dit_config import check_config as check_dit_config
from .dit_config import check_values as check_dit_values
from .options import check_range, invalid, option

# The DiT trainer's options that make no sense for a ControlNet: hidden from its command line
# and refused (naming them) when a --config file sets them.
NOT_CONTROLNET_OPTIONS = {
    "model": "the ControlNet is built from --init's DiT",
    "lora_rank": "the ControlNet's own weights train (no LoRA)",
    "lora_alpha": "the ControlNet's own weights train (no LoRA)",
    "lora_targets": "the ControlNet's own weights train (no LoRA)",
    "validation_prompts": "sample grids show cached samples with their control images",
    "text_encoder": "sample grids show cached samples with their control images",
}


@dataclass
class ControlNetTrainConfig(DiTTrainConfig):
    """Flow-matching training of a SANA ControlNet on a cache with control images (`python -m
    trainer cache --control-dir`): --init's DiT stays frozen, and the ControlNet (a new one made
    from its first --controlnet-blocks blocks with zero projections, or --controlnet's file)
    learns to steer it; the loss is the DiT trainer's. Under torchrun every process trains its
    share of each global batch (DDP, or FSDP with --distributed fsdp). Writes
    controlnet.safetensors and controlnet_ema.safetensors (for sana.load_controlnet and
    ComfyUI's Sana ControlNet Loader)."""

    output_dir: str = option("runs/controlnet", "where checkpoints, logs, samples and exported weights go")
    init: str = option("", "the base DiT the ControlNet steers (anything sana.load_dit reads); it stays frozen")
    model: str = option("", NOT_CONTROLNET_OPTIONS["model"], hidden=True)
    text_encoder: str = option("", NOT_CONTROLNET_OPTIONS["text_encoder"], hidden=True)
    validation_prompts: list[str] = option([], NOT_CONTROLNET_OPTIONS["validation_prompts"], hidden=True)
    sample_every: int = option(0, "steps between sample grids of the first cached samples, each generated with its control "
                               "image (0 disables; needs --vae)")
    lora_rank: int = option(0, NOT_CONTROLNET_OPTIONS["lora_rank"], hidden=True)
    lora_alpha: float = option(0.0, NOT_CONTROLNET_OPTIONS["lora_alpha"], hidden=True)
    lora_targets: list[str] = option([], NOT_CONTROLNET_OPTIONS["lora_targets"], hidden=True)
    controlnet: str = option("", "a ControlNet to train further (anything sana.load_controlnet reads); empty: a new one "
                             "copied from --init")
    controlnet_blocks: int = option(0, "DiT blocks a new ControlNet copies (0: NVlabs' 7, or depth − 1 for a shallower DiT)")


def check_config(config: ControlNetTrainConfig) -> None:
    """Raise `SanaInputError` naming the first unusable option; reads no file but stats paths."""
    check_values(config)
    if config.controlnet and not Path(config.controlnet).exists():
        raise invalid("controlnet", config.controlnet, "no such file or folder")
    check_dit_config(config)


def check_values(config: ControlNetTrainConfig) -> None:
    """The checks of `check_config` that read no file."""
    defaults = ControlNetTrainConfig()
    for name, why in NOT_CONTROLNET_OPTIONS.items():
        if getattr(config, name) != getattr(defaults, name):
            raise invalid(name, getattr(config, name), f"not an option of `trainer controlnet`: {why}")
    if not config.init:
        raise invalid("init", config.init, "give the base DiT the ControlNet steers (anything sana.load_dit reads)")
    check_dit_values(config)
    check_range(config, "controlnet_blocks", at_least=0)
    if config.controlnet and config.controlnet_blocks:
        raise invalid("controlnet_blocks", config.controlnet_blocks, f"a new ControlNet's size; --controlnet {config.controlnet} "
                      "has its own (give one of the two)")


def check_cache_has_control(config: ControlNetTrainConfig, cache) -> None:
    """A ControlNet trains on a cache holding a control image per sample."""
    if not cache.has_control:
        raise SanaInputError(f"--cache-dir {config.cache_dir}: the cache holds no control images, and a ControlNet learns from "
                             "them: build one with `python -m trainer cache --data IMAGES --control-dir CONTROL_IMAGES ...` "
                             "(or a JSONL manifest whose rows have a \"control\" key)")
    if config.flip and not cache.flips:
        raise invalid("flip", True, f"the cache {config.cache_dir} holds no mirrored images: build it with --flip true")
