"""Sigma / timestep tables against diffusers' own schedulers, exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SCMScheduler,
    StableDiffusion3Img2ImgPipeline,
)

from sana.dit import DIT_PRESETS, default_flow_shift
from sana.errors import SanaInputError
from sana.schedules import (
    flow_dpm_schedule,
    flow_euler_schedule,
    img2img_start_step,
    trigflow_schedule,
)

SHIFTS = (1.0, 3.0, 6.0)
STEPS = range(1, 51)


@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_dpm_tables_equal_diffusers(shift):
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    for steps in STEPS:
        scheduler.set_timesteps(steps)
        ours = flow_dpm_schedule(steps, shift)
        assert ours.timesteps.dtype == scheduler.timesteps.dtype == torch.int64
        assert torch.equal(ours.timesteps, scheduler.timesteps), (shift, steps)
        assert ours.sigmas.dtype == torch.float32
        assert torch.equal(ours.sigmas, scheduler.sigmas), (shift, steps)


@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_euler_tables_equal_diffusers(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    for steps in STEPS:
        scheduler.set_timesteps(steps)
        ours = flow_euler_schedule(steps, shift)
        assert ours.timesteps.dtype == scheduler.timesteps.dtype == torch.float32
        assert torch.equal(ours.timesteps, scheduler.timesteps), (shift, steps)
        assert torch.equal(ours.sigmas, scheduler.sigmas), (shift, steps)


def test_integer_shift_gives_the_same_tables():
    assert torch.equal(flow_dpm_schedule(20, 3).sigmas, flow_dpm_schedule(20, 3.0).sigmas)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_trigflow_angles_equal_scm_scheduler(steps):
    scheduler = SCMScheduler()
    # diffusers only accepts an intermediate angle for 2 steps; ours ignores it otherwise.
    scheduler.set_timesteps(steps, max_timesteps=1.57080, intermediate_timesteps=1.3 if steps == 2 else None)
    assert torch.equal(trigflow_schedule(steps), scheduler.timesteps)


def test_trigflow_custom_angles_equal_scm_scheduler():
    custom = [1.5, 1.1, 0.6, 0.0]
    scheduler = SCMScheduler()
    scheduler.set_timesteps(3, timesteps=custom, max_timesteps=None, intermediate_timesteps=None)
    assert torch.equal(trigflow_schedule(3, timesteps=custom), scheduler.timesteps)
    with pytest.raises(SanaInputError, match="4 entries, got 3"):
        trigflow_schedule(3, timesteps=custom[:3])


class _Img2ImgCut:
    """Enough of a pipeline for diffusers' own `get_timesteps` (SD3 img2img's, which the Sana
    Sprint img2img pipeline copies)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler


@pytest.mark.parametrize("steps", [4, 7, 20, 28])
def test_img2img_cut_equals_diffusers_get_timesteps(steps):
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    for strength in (0.05, 0.1, 0.3, 0.45, 0.5, 0.7, 0.75, 0.9, 1.0):
        scheduler.set_timesteps(steps)
        expected, expected_steps = StableDiffusion3Img2ImgPipeline.get_timesteps(
            _Img2ImgCut(scheduler), steps, strength, "cpu"
        )
        cut = flow_dpm_schedule(steps, 3.0).for_strength(strength)
        assert cut.num_steps == expected_steps, (steps, strength)
        assert torch.equal(cut.timesteps, expected)
        assert img2img_start_step(steps, strength) == scheduler.begin_index
        assert torch.equal(cut.sigmas, scheduler.sigmas[scheduler.begin_index :])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_step_counts_are_rejected(bad):
    with pytest.raises(SanaInputError, match="num_steps"):
        flow_dpm_schedule(bad, 3.0)


@pytest.mark.parametrize("bad", [0.0, -3.0, float("nan")])
def test_bad_shifts_are_rejected(bad):
    with pytest.raises(SanaInputError, match="shift"):
        flow_euler_schedule(10, bad)


def test_default_flow_shift_follows_sample_size():
    # 512/1024/2048 models (sample_size 16/32/64) use 3.0; the 4K model (128) uses 6.0.
    assert [default_flow_shift(s) for s in (16, 32, 64, 128)] == [3.0, 3.0, 3.0, 6.0]
    assert all(c.flow_shift == default_flow_shift(c.sample_size) for c in DIT_PRESETS.values())
