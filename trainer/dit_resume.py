"""Where a DiT training run starts: a fresh start, or the newest intact checkpoint of its run
folder, whose options are checked against the ones given now.

A resume may change how long the run goes, how it logs, saves and samples, and the hardware it
uses (`RESUMABLE_CHANGES`); any other change would change what the checkpoint's weights,
optimizer state or data order mean, and is refused naming each option with both values. A fresh
start never overwrites an earlier run's checkpoints or exports.
"""

from __future__ import annotations

from pathlib import Path

from sana.errors import SanaCheckpointError, SanaInputError

from .dit_checkpoint import EXPORTS
from .dit_config import DiTTrainConfig
from .options import flag, to_dict
from .run_folder import Report, Resumable, find_resumable, refuse_fresh_start

# A resumed optimizer would even silently keep the old learning rate: hence the short list.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "steps", "log_every", "save_every", "keep_checkpoints", "sample_every", "sample_steps",
    "sample_guidance", "vae", "text_encoder", "validation_prompts", "grad_accum", "grad_checkpointing", "distributed",
    "fsdp_cpu_offload", "ema_device", "device", "threads", "resume", "progress", "max_nan_losses", "report_to",
    "wandb_project",
})


def find_start(config: DiTTrainConfig, out: Path, say: Report, exports: tuple[str, ...] = EXPORTS) -> Resumable | None:
    """The checkpoint this run continues from (its options checked against the ones given now), or
    None for a fresh start, which must not overwrite an earlier run's checkpoints or `exports`."""
    if config.resume:
        resumable = find_resumable(out, say)
    else:
        refuse_fresh_start(out)
        resumable = None
    if resumable is not None:
        check_resume_options(resumable.state["config"], config, resumable.path, say)
        return resumable
    exported = [name for name in exports if (out / name).exists()]
    if exported:  # checkpoints are written before the exports: these were deleted
        raise SanaCheckpointError(
            f"{out} holds exported weights of an earlier run ({', '.join(exported)}) but no checkpoint to resume; "
            "starting over would overwrite them: give another --output-dir to start a new run"
        )
    return None


def check_resume_options(saved: dict, config: DiTTrainConfig, checkpoint: Path, say: Report) -> None:
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
