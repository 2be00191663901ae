"""What a DiT training run saves: the resumable state (`capture_state` / `restore_state`) and
the weights other tools read (`export_weights`: a diffusers folder for `sana.load_dit`, or a LoRA
file for `sana.load_lora`, raw and EMA; `save_checkpoint` takes another run's export, e.g. the
ControlNet trainer's). A LoRA's or ControlNet's state keeps only the trained weights (`Parts.partial`).

The state holds tensors and plain data only (`state.pt` loads with weights_only), every random
number generator's state included, so a resumed run continues exactly where the saved one was.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from sana.dit import SanaDiT
from sana.dit_io import save_dit
from sana.errors import SanaCheckpointError

from . import distributed
from .dit_config import DiTTrainConfig
from .dit_step import Parts, swapped
from .options import to_dict
from .plotting import plot_loss
from .run_folder import prune_checkpoints, save_state

EXPORTS = ("transformer", "transformer_ema", "lora.safetensors", "lora_ema.safetensors")  # export_weights' outputs


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


def capture_state(parts: Parts, config: DiTTrainConfig, step: int, data_position: tuple[int, int], non_finite: int,
                  seconds: float) -> dict:
    """The resumable state, with whole tensors (a collective under FSDP: every rank calls it). A
    LoRA run keeps only the adapters: the frozen base is --init's, rebuilt on resume."""
    strategy = config.distributed
    weights = distributed.full_state_dict(parts.wrapped, strategy)
    if parts.partial:
        weights = {name: tensor for name, tensor in weights.items() if name in parts.trained}
    return {
        "model": weights,
        "optimizer": distributed.optimizer_state_dict(parts.wrapped, parts.optimizer, strategy),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "rng": rng_state(parts.generator),
        "step": step,
        "data_position": data_position,
        "non_finite_steps": non_finite,
        "seconds": seconds,  # training time so far: the log's clock continues across resumes
        "config": to_dict(config),
    }


def restore_state(parts: Parts, state: dict, config: DiTTrainConfig) -> tuple[int, tuple[int, int], int, float]:
    """Load `capture_state`'s state; returns its (step, data position, non-finite steps so far,
    training seconds so far)."""
    missing = sorted(set(parts.trained) - set(state["model"]))
    if missing:  # a LoRA (ControlNet) checkpoint holds the adapters (ControlNet) only: every one of them must be there
        raise SanaCheckpointError(f"the checkpoint lacks trained weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    distributed.load_full_state_dict(parts.wrapped, config.distributed, state["model"], strict=not parts.partial)
    distributed.load_optimizer_state_dict(parts.wrapped, parts.optimizer, config.distributed, state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None:
        parts.ema.load_state_dict(state["ema"], like=parts.trained)
    set_rng_state(parts.generator, state["rng"])
    epoch, batch_index = state["data_position"]
    return state["step"], (epoch, batch_index), state.get("non_finite_steps", 0), float(state.get("seconds", 0.0))


def save_checkpoint(out: Path, state: dict, model: torch.nn.Module, config: DiTTrainConfig, export=None) -> None:
    """Resumable state under checkpoints/, plus weights other tools read directly (`export(out,
    state, model, config)`, default `export_dit`: what sana.load_dit or sana.load_lora reads);
    older checkpoints are pruned only once both are written. `state` holds finite weights
    (checked by the caller on every rank)."""
    save_state(out, state)
    (export or export_dit)(out, state, model, config)
    prune_checkpoints(out, config.keep_checkpoints, state["step"])
    plot_loss(out / "loss.jsonl", out / "loss.png")


def export_dit(out: Path, state: dict, model: SanaDiT, config: DiTTrainConfig) -> None:
    """`export_weights` of the trained DiT (or its LoRA), with whole weights under FSDP."""
    if distributed.is_sharded(model):  # FSDP shards: export from the whole weights gathered in `state`
        model = SanaDiT(model.config)
        model.load_state_dict(state["model"])
    export_weights(out, model, state["ema"]["shadow"] if state["ema"] is not None else None, config)


def export_weights(out: Path, model: SanaDiT, ema_weights: dict[str, torch.Tensor] | None, config: DiTTrainConfig) -> None:
    """`transformer/` (raw) and `transformer_ema/` as diffusers folders, or `lora.safetensors` (+ `_ema`): `EXPORTS`.

    `model` holds whole (unsharded) weights; `ema_weights` are the EMA's whole tensors, if any."""
    if config.lora_rank:
        from sana.lora import save_lora

        save_lora(model, out / "lora.safetensors")
        if ema_weights is not None:
            with swapped(model, ema_weights):
                save_lora(model, out / "lora_ema.safetensors")
        return
    save_dit(model, out / "transformer")
    if ema_weights is not None:
        with swapped(model, ema_weights):
            save_dit(model, out / "transformer_ema")

