"""Memory that fits real cards (issue 18 §2): the training memory model's method on known
sequences and against a real step, stochastic-rounding AdamW for bf16 weights, the optional 8-bit
optimizer, and the bench script."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sana.errors import SanaInputError
from sana.memory_plan import LiveBytes, storage_key
from trainer.memory_plan import (
    TrainingOptions,
    build_model,
    measure_forward_backward,
    plan_training_memory,
    state_bytes,
    step_inputs,
)
from trainer.optimizers import StochasticAdamW, check_optimizer_available, make_optimizer, round_to_bf16
from trainer.tiny_models import tiny_dit_config

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_dit_config(8, 32, 4, hidden_size=64, depth=2)


def test_live_bytes_leaves_out_chosen_storages_on_a_known_sequence():
    with LiveBytes([]) as mode:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = torch.empty(2000, device="meta")  # 12000 live: the peak
        del a
        c = torch.empty(500, device="meta")  # 10000 live
        left_out = {storage_key(b)}
        del b, c
    assert mode.peak == 12000
    assert mode.peak_without(left_out) == 4000  # a alone; then c alone (2000)


def test_forward_backward_on_meta_counts_what_a_real_step_allocates():
    """The modelled step runs the operations of a real one on meta tensors: a bf16 LoRA step on
    the CPU (bf16 takes `F.linear`, as a GPU does; fp32 on the CPU routes linears through
    convolutions) with attention's reference path, which meta always takes. Meta kernels keep
    layer-norm statistics in fp32 where the CPU's keep bf16, and fold a few batched matmuls
    differently: a few hundred bytes of a 2.5 MB peak, and never below."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    options = TrainingOptions(lora_rank=4, weights_dtype="bf16")
    torch.manual_seed(0)
    real = build_model(TINY, options, torch.bfloat16, device="cpu")
    meta = build_model(TINY, options, torch.bfloat16)
    modelled = measure_forward_backward(meta, step_inputs(meta, 4, 2))[0]
    with sdpa_kernel(SDPBackend.MATH):
        counted = measure_forward_backward(real, step_inputs(real, 4, 2, "cpu"))[0]
    assert counted <= modelled <= 1.001 * counted, (modelled, counted)


@pytest.mark.parametrize("options", [TrainingOptions(mixed_precision="no"), TrainingOptions(lora_rank=4, mixed_precision="no"),
                                     TrainingOptions(weights_dtype="bf16")])
def test_modelled_weights_gradients_and_states_are_what_training_holds(options):
    """A real CPU step with the trainer's optimizer: its weights, gradients and optimizer states
    take exactly the modelled bytes."""
    plan = plan_training_memory(TINY, 128, 1, options)
    dtype = torch.float32 if options.weights_dtype == "fp32" else torch.bfloat16
    model = build_model(TINY, options, dtype, device="cpu")
    trained = [p for p in model.parameters() if p.requires_grad]
    x, t, context, mask = step_inputs(model, 4, 1, "cpu")
    model(x, t, context, mask).float().square().mean().backward()
    optimizer = make_optimizer(trained, "adamw", lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)
    optimizer.step()
    held = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim)
    assert plan.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.gradients == sum(p.grad.numel() * p.grad.element_size() for p in trained)
    assert plan.optimizer_states == held
    assert plan.ema == 4 * sum(p.numel() for p in trained)


def test_memory_options_lower_the_modelled_peak_of_a_full_fine_tune():
    """Each option removes what it says: bf16 weights halve weights and gradients, the 8-bit
    optimizer takes 2 bytes a weight instead of 8, a CPU EMA frees 4."""
    base = plan_training_memory(TINY, 128, 1, TrainingOptions())
    bf16 = plan_training_memory(TINY, 128, 1, TrainingOptions(weights_dtype="bf16"))
    eight_bit = plan_training_memory(TINY, 128, 1, TrainingOptions(weights_dtype="bf16", optimizer="adamw8bit", ema="cpu"))
    params = sum(p.numel() for p in SanaDiT_params(TINY))
    assert base.weights == 4 * params and bf16.weights == 2 * params and bf16.gradients == 2 * params
    assert eight_bit.ema == 0 and eight_bit.optimizer_states == state_bytes(list(SanaDiT_params(TINY)), "adamw8bit") < bf16.optimizer_states
    assert base.peak > bf16.peak > eight_bit.peak


def SanaDiT_params(config):  # noqa: N802 - the DiT's parameters, on meta
    return list(build_model(config, TrainingOptions(), torch.float32).parameters())


# --------------------------------------------------------------------------------------------
# Stochastic-rounding AdamW
# --------------------------------------------------------------------------------------------


def test_stochastic_adamw_is_adamw_for_fp32_weights():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(64, 32)), None
    theirs = torch.nn.Parameter(ours.detach().clone())
    a = StochasticAdamW([ours], lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(5):
        grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    # The same formula in the same order; fp32 rounding may still differ in the last place.
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_stochastic_rounding_keeps_small_updates_that_bf16_loses():
    """500 steps of −2e-4 on weights of 1.0 (a 20th of a bf16 step there): round-to-nearest
    never moves, stochastic rounding follows the fp32 trajectory on average."""
    start = torch.ones(16384)
    exact = torch.nn.Parameter(start.clone())
    rounded = torch.nn.Parameter(start.clone().bfloat16())
    nearest = torch.nn.Parameter(start.clone().bfloat16())
    optimizers = [StochasticAdamW([exact], lr=2e-4), StochasticAdamW([rounded], lr=2e-4),
                  torch.optim.AdamW([nearest], lr=2e-4, foreach=False)]
    for _ in range(500):
        for p, optimizer in zip((exact, rounded, nearest), optimizers):
            p.grad = torch.ones_like(p)
            optimizer.step()
    target = float(exact.detach().mean())
    assert abs(target - 0.9) < 1e-3
    assert float(nearest.float().mean()) == 1.0
    # Each rounding adds noise of at most half a bf16 step (0.002): over 500 steps and 16384
    # weights the mean's spread is about 0.002 · √500 / 128 ≈ 3.5e-4; round-to-nearest is 0.1 off.
    assert abs(float(rounded.float().mean()) - target) < 2e-3


def test_round_to_bf16_picks_a_neighbour_and_keeps_representable_values():
    values = torch.tensor([1.0, 1.0 + 2**-9, -3.25, 1e-20])
    generator = torch.Generator().manual_seed(0)
    rounded = torch.stack([round_to_bf16(values, generator).float() for _ in range(200)])
    assert torch.all(rounded[:, 0] == 1.0) and torch.all(rounded[:, 2] == -3.25)
    assert set(rounded[:, 1].tolist()) == {1.0, 1.0 + 2**-7}  # a quarter of the way: up one time in four
    assert 0.15 < float((rounded[:, 1] > 1).float().mean()) < 0.35


def test_stochastic_adamw_resumes_with_fp32_moments():
    p = torch.nn.Parameter(torch.randn(16, 8).bfloat16())
    optimizer = StochasticAdamW([p], lr=1e-3)
    p.grad = torch.randn(16, 8).bfloat16()
    optimizer.step()
    saved = optimizer.state_dict()
    fresh = StochasticAdamW([p], lr=1e-3)
    fresh.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        assert fresh.state[p][key].dtype == torch.float32 and torch.equal(fresh.state[p][key], optimizer.state[p][key])


# --------------------------------------------------------------------------------------------
# The optional 8-bit optimizer
# --------------------------------------------------------------------------------------------


def test_a_missing_optimizer_package_is_an_input_error_naming_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(SanaInputError, match=r"--optimizer adamw8bit: needs the bitsandbytes package.*pip install bitsandbytes"):
        check_optimizer_available("adamw8bit")


def test_an_unusable_optimizer_package_is_an_input_error(monkeypatch):
    def broken(name, *args):
        raise OSError(f"lib{name}.so: cannot open shared object file")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(SanaInputError, match="--optimizer adamw8bit: the bitsandbytes package cannot be imported here"):
        make_optimizer([torch.nn.Parameter(torch.zeros(4))], "adamw8bit", lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)


def test_adamw8bit_keeps_one_byte_a_moment():
    pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.randn(128, 64))
    optimizer = make_optimizer([p], "adamw8bit", lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    optimizer.step()
    state = optimizer.state[p]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert not torch.equal(p, before)


# --------------------------------------------------------------------------------------------
# The bench script
# --------------------------------------------------------------------------------------------


def test_bench_script_prints_the_table():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_memory_model.py"), "--dit", "sana-600m-512", "--resolution", "512",
         "--batches", "1", "--options", "lora-bf16", "full-8bit"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "GiB" not in line and "---" not in line]
    assert len(rows) == 2 and "--lora-rank 32" in rows[0] and "adamw8bit" in rows[1], proc.stdout
