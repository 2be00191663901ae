"""The DiT trainer's options (`DiTTrainConfig`, one `--flag` each) and their checks.

`check_config` refuses an unusable option with a `SanaInputError` naming it, before anything is
loaded; `check_values` is the part that needs no file (the preset runs it on its overrides
before its first stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sana.dit import DIT_PRESETS
from sana.errors import SanaInputError

from . import distributed
from .optimizers import check_optimizer_available
from .options import check_range, check_types, invalid, option
from .reporting import check_report_to


@dataclass
class DiTTrainConfig:
    """Flow-matching training of the SANA DiT on a latent cache (`python -m trainer cache`): a full
    fine-tune of --init (or of a new --model), or a LoRA of it with --lora-rank. Under torchrun
    every process trains its share of each global batch (DDP, or FSDP with --distributed fsdp)."""

    output_dir: str = option("runs/dit", "where checkpoints, logs, samples and exported weights go")
    cache_dir: str = option("", "latent/text cache folder (built by `python -m trainer cache`)")
    init: str = option("", "checkpoint to fine-tune (anything sana.load_dit reads); empty: train from scratch")
    model: str = option("", "architecture when training from scratch: a DIT_PRESETS name or a JSON SanaDiTConfig file")
    vae: str = option("", "DC-AE checkpoint, only used to decode sample grids (--sample-every)")
    text_encoder: str = option("", "text encoder (anything sana.load_text_encoder reads), only used to encode --validation-prompts at the start")
    steps: int = option(1000, "optimizer steps to train")
    batch_size: int = option(16, "global batch size (all processes, all accumulation micro-steps)")
    grad_accum: int = option(1, "gradient accumulation micro-steps per optimizer step")
    optimizer: str = option("adamw", "adamw; adamw8bit (8-bit states, 2 bytes a weight: needs bitsandbytes); or came (needs came_pytorch)",
                            choices=["adamw", "adamw8bit", "came"])
    lr: float = option(1e-4, "peak learning rate")
    weight_decay: float = option(0.0, "decoupled weight decay")
    betas: list[float] = option([0.9, 0.999], "Adam betas, two values in [0, 1) (CAME: three; the default gives CAME's own)")
    eps: float = option(1e-8, "Adam epsilon")
    warmup_steps: int = option(0, "linear warm-up steps, then constant LR")
    grad_clip: float = option(1.0, "max gradient norm (0 disables)")
    ema_decay: float = option(0.999, "EMA decay of the trained weights (0 disables EMA)")
    ema_device: str = option("same", "where the fp32 EMA lives: same (the training device) or cpu (frees 4 bytes a trained weight on the GPU)",
                             choices=["same", "cpu"])
    weights_dtype: str = option("fp32", "dtype of the DiT's weights while training: bf16 halves them (a LoRA's frozen base; a full "
                                "fine-tune's weights, then updated with stochastic rounding from fp32 optimizer states)",
                                choices=["fp32", "bf16"])
    mixed_precision: str = option("no", "autocast dtype for the forward pass", choices=["no", "bf16", "fp16"])
    grad_checkpointing: bool = option(False, "recompute block activations in backward to save memory")
    caption_dropout: float = option(0.1, "probability of training a sample on the empty prompt (for CFG)")
    repeats: int = option(1, "times each cached image is seen per epoch (small datasets)")
    flip: bool = option(False, "train half the samples on their mirrored image (needs a cache built with --flip true; off: captions may name sides)")
    logit_mean: float = option(0.0, "logit-normal timestep sampling mean")
    logit_std: float = option(1.0, "logit-normal timestep sampling std")
    flow_shift: float = option(0.0, "training σ shift; 0 uses the model config's flow_shift")
    seed: int = option(0, "seed for initialisation, data order and noise")
    log_every: int = option(10, "steps between loss-log rows")
    save_every: int = option(500, "steps between resumable checkpoints and exported weights (0: only at the end)")
    keep_checkpoints: int = option(2, "resumable checkpoints kept on disk (0: all)")
    sample_every: int = option(0, "steps between sample grids (0 disables; needs --vae, and --validation-prompts or the cache's sample prompts)")
    validation_prompts: list[str] = option([], "prompts of the sample grids, encoded at the start with --text-encoder (default: the cache's sample prompts)")
    sample_steps: int = option(20, "Flow-DPM-Solver steps for sample grids")
    sample_guidance: float = option(4.5, "CFG scale for sample grids")
    lora_rank: int = option(0, "train a LoRA of this rank instead of the full model (0: full fine-tune)")
    lora_alpha: float = option(0.0, "LoRA alpha (0: equal to the rank)")
    lora_targets: list[str] = option(["to_q", "to_k", "to_v"], "LoRA target layers, diffusers module names or suffixes (to_q, to_out.0, attn2.to_k, conv_inverted, ...)")
    distributed: str = option("ddp", "multi-process strategy under torchrun", choices=["ddp", "fsdp"])
    fsdp_cpu_offload: bool = option(False, "with --distributed fsdp: keep the weight shards, gradients and optimizer states in CPU memory")
    device: str = option("auto", "cpu, cuda, cuda:N, mps or auto")
    threads: int = option(0, "CPU threads (0: the CPUs this process may use, shared among the processes of a machine)")
    report_to: str = option("auto", "where to log loss, LR, grad norm, throughput and samples besides loss.jsonl: tensorboard, wandb, all, none, "
                            "or auto (tensorboard when installed)", choices=["auto", "tensorboard", "wandb", "all", "none"])
    wandb_project: str = option("sana-trainer", "W&B project for --report-to wandb")
    resume: bool = option(True, "continue from the latest checkpoint in output_dir if there is one")
    progress: bool = option(True, "show a progress bar")
    max_nan_losses: int = option(20, "stop after this many steps with a non-finite loss or gradient (each is skipped)")


DEFAULT_BETAS = [0.9, 0.999]
MAX_SEED = 2**32 - 1


def check_config(config: DiTTrainConfig) -> None:
    """Raise `SanaInputError` naming the first unusable option; reads no file but stats paths."""
    check_values(config)
    if not config.output_dir:
        raise invalid("output_dir", config.output_dir, "give the run folder")
    if not config.cache_dir:
        raise invalid("cache_dir", config.cache_dir, "give the latent cache folder built by `python -m trainer cache`")
    _check_model_source(config)
    for name in ("vae", "text_encoder"):
        if getattr(config, name) and not Path(getattr(config, name)).exists():
            raise invalid(name, getattr(config, name), "no such file or folder")
    _check_optimizer_package(config)
    distributed.check_device(config.device)
    if config.fsdp_cpu_offload and distributed.pick_device(config.device).type != "cuda":
        raise SanaInputError(f"--fsdp-cpu-offload: moves the FSDP shards off a CUDA device; this run trains on "
                             f"{distributed.pick_device(config.device)} (--device {config.device})")
    if config.fsdp_cpu_offload and not distributed.launched_by_torchrun():
        raise SanaInputError("--fsdp-cpu-offload: FSDP runs under torchrun (on one GPU: torchrun --nproc_per_node 1 -m trainer dit ...)")
    check_report_to(config.report_to)
    if not (Path(config.cache_dir) / "cache.json").is_file():
        raise invalid("cache_dir", config.cache_dir, "not a latent cache folder (no cache.json): build it with `python -m trainer cache`")


def check_values(config: DiTTrainConfig) -> None:
    """The checks of `check_config` that read no file: types, ranges and combinations."""
    check_types(config)
    for name in ("steps", "batch_size", "grad_accum", "log_every", "sample_steps", "max_nan_losses", "repeats"):
        check_range(config, name, at_least=1)
    for name in ("warmup_steps", "save_every", "keep_checkpoints", "sample_every", "lora_rank", "threads"):
        check_range(config, name, at_least=0)
    for name in ("weight_decay", "grad_clip", "flow_shift", "sample_guidance", "lora_alpha"):
        check_range(config, name, at_least=0.0)
    for name in ("lr", "eps", "logit_std"):
        check_range(config, name, above=0.0)
    check_range(config, "ema_decay", at_least=0.0, below=1.0)
    check_range(config, "caption_dropout", at_least=0.0, at_most=1.0)
    check_range(config, "seed", at_least=0, at_most=MAX_SEED)
    if config.batch_size % config.grad_accum:
        raise invalid("batch_size", config.batch_size, f"must be divisible by --grad-accum {config.grad_accum} (and the number of processes)")
    _check_betas(config)
    if config.lora_rank and not config.lora_targets:
        raise invalid("lora_targets", config.lora_targets, "give at least one target layer for the LoRA")
    if config.lora_rank and config.distributed == "fsdp":
        raise SanaInputError("--lora-rank with --distributed fsdp: LoRA training runs with --distributed ddp; "
                             "fsdp is for full fine-tunes of models that do not fit one GPU")
    if config.fsdp_cpu_offload and config.distributed != "fsdp":
        raise invalid("fsdp_cpu_offload", True, "offloads FSDP shards: give --distributed fsdp too (under torchrun)")
    if config.ema_device == "cpu" and config.distributed == "fsdp":
        raise invalid("ema_device", "cpu", "with --distributed fsdp the EMA is sharded like the weights: use "
                      "--fsdp-cpu-offload true to keep both in CPU memory")
    if config.weights_dtype == "bf16" and config.optimizer == "came" and not config.lora_rank:
        raise invalid("optimizer", "came", "keeps its states in the weights' dtype: with --weights-dtype bf16 use adamw "
                      "(fp32 states, stochastic rounding) or adamw8bit")
    if config.weights_dtype == "bf16" and config.mixed_precision == "fp16":
        raise invalid("mixed_precision", "fp16", "with --weights-dtype bf16 the forward pass runs in bf16: use --mixed-precision bf16 or no")
    if config.validation_prompts and not config.text_encoder:
        raise invalid("validation_prompts", config.validation_prompts, "give --text-encoder to encode them")
    if config.sample_every and not config.vae:
        raise invalid("sample_every", config.sample_every, "sample grids are decoded with the DC-AE: give --vae (or --sample-every 0)")


def _check_model_source(config: DiTTrainConfig) -> None:
    if bool(config.init) == bool(config.model):
        raise SanaInputError("give either --init (a checkpoint to fine-tune) or --model (a DIT_PRESETS name or a "
                             f"JSON SanaDiTConfig file to train from scratch); got --init {config.init!r} --model {config.model!r}")
    if config.init and not Path(config.init).exists():
        raise invalid("init", config.init, "no such file or folder")
    if config.model and config.model not in DIT_PRESETS and not Path(config.model).is_file():
        raise invalid("model", config.model, f"neither a DIT_PRESETS name ({sorted(DIT_PRESETS)}) nor a JSON file")


def _check_betas(config: DiTTrainConfig) -> None:
    betas = list(config.betas)
    wanted = 3 if config.optimizer == "came" and betas != DEFAULT_BETAS else 2
    if len(betas) != wanted or not all(0.0 <= b < 1.0 for b in betas):
        raise invalid("betas", betas, f"expected {wanted} values in [0, 1) for --optimizer {config.optimizer}")


def _check_optimizer_package(config: DiTTrainConfig) -> None:
    check_optimizer_available(config.optimizer)
    if config.optimizer == "adamw8bit" and config.distributed == "fsdp":
        raise invalid("optimizer", "adamw8bit", "bitsandbytes' 8-bit states do not shard with --distributed fsdp: use "
                      "--distributed ddp, or adamw with --fsdp-cpu-offload")
