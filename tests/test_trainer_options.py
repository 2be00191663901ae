"""The DiT trainer's options for real cards and real datasets (issue 18 §2-§4): bf16 weights and
LoRA bases, adapter-only LoRA checkpoints, the EMA on the CPU, repeats and mirrored images,
TensorBoard and W&B, validation prompts, the run's clock across resumes, threads, FSDP offload,
what each rank prints."""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from sana.errors import SanaInputError
from test_trainer import PROMPTS, _config, world  # noqa: F401  (the shared tiny cache)
from test_trainer_cache import _build, _dataset
from trainer import distributed
from trainer.cache import LatentCache
from trainer.data import BucketBatches
from trainer.train_dit import train_dit


def _state(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:07d}" / "state.pt", weights_only=True)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Weights, optimizer states, EMA
# --------------------------------------------------------------------------------------------


def test_lora_checkpoints_hold_the_adapters_only_and_resume_exactly(world, tmp_path):  # noqa: F811
    """A LoRA on a bf16 base: the checkpoint stores its adapters (not the 1.6B base), and a run
    resumed from one ends where the uninterrupted run does."""
    lora = dict(lora_rank=4, weights_dtype="bf16", steps=4, save_every=2, ema_decay=0.9)
    summary = train_dit(_config(world, tmp_path / "straight", **lora))
    model = summary["model"]
    assert model.blocks[0].attn.qkv.base.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    state = _state(tmp_path / "straight", 2)
    assert state["model"] and all(".lora_" in name for name in state["model"])
    train_dit(_config(world, tmp_path / "resumed", **{**lora, "steps": 2}))
    train_dit(_config(world, tmp_path / "resumed", **lora))
    from safetensors.torch import load_file

    for name in ("lora.safetensors", "lora_ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_bf16_full_fine_tune_keeps_fp32_optimizer_states_and_an_ema_on_the_cpu(world, tmp_path):  # noqa: F811
    from sana import load_dit

    bf16 = dict(weights_dtype="bf16", mixed_precision="bf16", steps=2, save_every=2)
    summary = train_dit(_config(world, tmp_path / "same", **bf16))
    assert next(summary["model"].parameters()).dtype == torch.bfloat16
    state = _state(tmp_path / "same", 2)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert load_dit(tmp_path / "same" / "transformer").dtype == torch.bfloat16
    # The EMA on the CPU is the same EMA (here the device is the CPU too: the same numbers).
    train_dit(_config(world, tmp_path / "cpu", ema_device="cpu", **bf16))
    a = load_dit(tmp_path / "same" / "transformer_ema").state_dict()
    b = load_dit(tmp_path / "cpu" / "transformer_ema").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adamw8bit_full_fine_tune_resumes_exactly(world, tmp_path):  # noqa: F811
    """bitsandbytes' 8-bit AdamW (its CPU build): the checkpoint holds its quantized states, which
    load without code execution, and a resumed run ends where the uninterrupted one does."""
    pytest.importorskip("bitsandbytes")
    from sana import load_dit

    eight = dict(weights_dtype="bf16", optimizer="adamw8bit", ema_device="cpu", steps=4, save_every=2)
    train_dit(_config(world, tmp_path / "straight", **eight))
    train_dit(_config(world, tmp_path / "resumed", **{**eight, "steps": 2}))
    train_dit(_config(world, tmp_path / "resumed", **eight))
    for name in ("transformer", "transformer_ema"):
        a = load_dit(tmp_path / "straight" / name).state_dict()
        b = load_dit(tmp_path / "resumed" / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in _rows(tmp_path / "straight")] == [r["loss"] for r in _rows(tmp_path / "resumed")]


@pytest.mark.parametrize(("changes", "option"), [
    ({"optimizer": "came", "weights_dtype": "bf16"}, "--optimizer"),
    ({"weights_dtype": "bf16", "mixed_precision": "fp16"}, "--mixed-precision"),
    ({"ema_device": "cpu", "distributed": "fsdp"}, "--ema-device"),
    ({"fsdp_cpu_offload": True}, "--fsdp-cpu-offload"),
    ({"fsdp_cpu_offload": True, "distributed": "fsdp"}, "--fsdp-cpu-offload"),  # the CPU is no CUDA device
    ({"repeats": 0}, "--repeats"),
    ({"threads": -1}, "--threads"),
    ({"sample_every": 2}, "--sample-every"),  # no --vae to decode them
    ({"validation_prompts": ["a red circle"]}, "--validation-prompts"),  # no --text-encoder
    ({"report_to": "wandb"}, "--report-to"),  # not installed here
])
def test_memory_and_logging_options_are_checked_first(world, tmp_path, changes, option, monkeypatch):  # noqa: F811
    real_find_spec = __import__("importlib").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(SanaInputError, match=option):
        train_dit(_config(world, tmp_path / "run", **changes))
    assert not (tmp_path / "run").exists()


def test_fsdp_cpu_offload_wraps_every_block_with_the_offload_policy(monkeypatch):
    import torch.distributed.fsdp as fsdp

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kwargs: calls.append(type(kwargs.get("offload_policy")).__name__))
    model = types.SimpleNamespace(blocks=[object(), object()])
    world = distributed.World(rank=0, size=2, local_rank=0, device=torch.device("cpu"))
    distributed.wrap_model(model, world, "fsdp", cpu_offload=True)
    assert calls == ["CPUOffloadPolicy"] * 3
    calls.clear()
    distributed.wrap_model(model, world, "fsdp")
    assert calls == ["NoneType"] * 3


# --------------------------------------------------------------------------------------------
# Small datasets
# --------------------------------------------------------------------------------------------


def test_repeats_show_each_sample_that_many_times_an_epoch():
    sizes = [(4, 4)] * 6
    once, thrice = BucketBatches(sizes, 2, seed=0), BucketBatches(sizes, 2, seed=0, repeats=3)
    counts = torch.bincount(torch.tensor([i for batch in thrice.epoch(0) for i in batch]), minlength=6)
    assert len(once.epoch(0)) == 3 and len(thrice.epoch(0)) == 9 and counts.tolist() == [3] * 6
    assert BucketBatches(sizes, 7, seed=0, repeats=2).epoch(0)  # 6 samples fill a batch of 7 when repeated


def test_buckets_too_small_for_a_batch_are_reported(world, tmp_path, capsys):  # noqa: F811
    sampler = BucketBatches([(4, 4)] * 5 + [(4, 8)] * 2, batch_size=4, seed=0)
    assert sampler.unusable == {(4, 8): 2}
    data = _dataset(tmp_path / "data", 4)
    _dataset(data, 1, start=4, size=(32, 64))
    _build(world, data, tmp_path / "cache")
    train_dit(_config(world, tmp_path / "run", cache_dir=str(tmp_path / "cache"), steps=1, batch_size=2, save_every=0))
    err = capsys.readouterr().err
    assert "1 cached sample(s) are in aspect-ratio buckets smaller than --batch-size 2" in err and "--min-bucket-size 2" in err


def test_flip_trains_on_the_mirrored_latents(world, tmp_path, monkeypatch):  # noqa: F811
    data = _dataset(tmp_path / "data", 4)
    _build(world, data, tmp_path / "cache", flip=True)
    mirrored = []
    real = LatentCache.flipped
    monkeypatch.setattr(LatentCache, "flipped", lambda self, i: mirrored.append(i) or real(self, i))
    train_dit(_config(world, tmp_path / "run", cache_dir=str(tmp_path / "cache"), steps=4, batch_size=2, flip=True, save_every=0))
    assert 0 < len(mirrored) < 8  # about half of the 8 samples drawn
    with pytest.raises(SanaInputError, match="--flip: the cache .* holds no mirrored images"):
        train_dit(_config(world, tmp_path / "plain", steps=1, flip=True))


# --------------------------------------------------------------------------------------------
# Logging and validation
# --------------------------------------------------------------------------------------------


def test_tensorboard_logs_scalars_and_sample_grids_and_resumes(world, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    options = dict(report_to="tensorboard", steps=2, save_every=2, sample_every=2, sample_steps=2, vae=str(world["vae"]))
    train_dit(_config(world, run, **options))
    train_dit(_config(world, run, **{**options, "steps": 4}))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for name in ("loss", "lr", "grad_norm", "samples_per_second", "seconds"):
        assert f"train/{name}" in tags["scalars"], tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Images("samples")] == [2, 4]


def test_wandb_is_optional_and_resumes_its_run(world, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.util = types.SimpleNamespace(generate_id=lambda: "run123")
    fake.Image = lambda array: ("image", array.shape)

    class Run:
        def log(self, values, step):
            calls.append(("log", step, sorted(values)))

        def finish(self):
            calls.append(("finish",))

    fake.init = lambda **kwargs: calls.append(("init", kwargs["id"], kwargs["resume"])) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    train_dit(_config(world, run, report_to="wandb", steps=2, save_every=2))
    train_dit(_config(world, run, report_to="wandb", steps=3, save_every=2))
    assert [c for c in calls if c[0] == "init"] == [("init", "run123", "allow")] * 2
    logged = [c for c in calls if c[0] == "log"]
    assert [step for _, step, _ in logged] == [1, 2, 3] and "train/loss" in logged[0][2]


def test_validation_prompts_are_encoded_at_train_time(world, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train_dit(_config(world, run, steps=2, save_every=0, sample_every=2, sample_steps=2, vae=str(world["vae"]),
                      validation_prompts=["a small green circle on the left"], text_encoder=str(world["root"] / "text_encoder")))
    assert (run / "samples" / "step_0000002.png").stat().st_size > 500
    # A cache without sample prompts and no validation prompts: the grid has nothing to show.
    bare = tmp_path / "bare"
    shutil.copytree(world["cache"], bare)
    data = _dataset(tmp_path / "data", 2)
    _build(world, data, bare / "rebuilt")
    with pytest.raises(SanaInputError, match="--sample-every 2: no prompts to sample"):
        train_dit(_config(world, tmp_path / "none", cache_dir=str(bare / "rebuilt"), batch_size=2, sample_every=2,
                          vae=str(world["vae"])))


def test_the_log_clock_continues_across_a_resume(world, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train_dit(_config(world, run, steps=2, save_every=2))
    first = _rows(run)[-1]["seconds"]
    train_dit(_config(world, run, steps=4, save_every=2))
    seconds = [row["seconds"] for row in _rows(run)]
    assert seconds == sorted(seconds) and seconds[2] > first  # step 3 is later than step 2, not back at 0


# --------------------------------------------------------------------------------------------
# Processes and threads
# --------------------------------------------------------------------------------------------


def test_threads_default_to_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a container allowed 1.5 CPUs
    monkeypatch.setattr(distributed, "CGROUP_CPU_MAX", quota)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    try:
        assert distributed.usable_cpus() == 1 and distributed.set_cpu_threads(0) == 1
        quota.write_text("max 100000\n")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks share the 8 CPUs
        assert distributed.set_cpu_threads(0) == 2 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert distributed.set_cpu_threads(0) == 3 and distributed.set_cpu_threads(5) == 5
    finally:
        torch.set_num_threads(before)


def test_only_rank_0_prints_the_summary_and_errors_name_their_rank(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    import trainer.train_dit
    from trainer.__main__ import main

    argv = ["dit", "--cache-dir", str(world["cache"]), "--model", str(world["arch"]), "--steps", "1", "--batch-size", "4",
            "--save-every", "0", "--progress", "false", "--report-to", "none", "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1
    # Rank 1 of a torchrun launch (its training stood in for: the printing is what is tested).
    monkeypatch.setenv("RANK", "1")
    from trainer.dit_config import check_config

    monkeypatch.setattr(trainer.train_dit, "train_dit", lambda config: check_config(config) or {"step": 1, "model": None})
    assert main(argv) == 0
    assert capsys.readouterr().out == ""
    assert main([*argv, "--steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: rank 1: --steps 0")
