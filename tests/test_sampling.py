"""The sampling vocabulary `generate`, the nodes and the trainer share (`sana.sampling`): the
schedule choice and the guided text batch, each against the pieces it is built from."""

from __future__ import annotations

import pytest
import torch

from sana.errors import SanaInputError
from sana.samplers import flow_time_from_trigflow, guidance_branches
from sana.sampling import flow_schedule, guided_context, sampling_schedule, trigflow_angles
from sana.schedules import flow_dpm_schedule, flow_euler_schedule, trigflow_schedule


@pytest.mark.parametrize(("solver", "build"), [("flow_dpm_solver", flow_dpm_schedule), ("flow_euler", flow_euler_schedule)])
def test_flow_schedules_are_the_tables_cut_by_strength(solver, build):
    full = build(10, 4.5)
    for strength, skipped in ((1.0, 0), (0.6, 4), (0.05, 9)):
        schedule = flow_schedule(solver, 10, 4.5, strength)
        assert torch.equal(schedule.sigmas, full.sigmas[skipped:]) and torch.equal(schedule.timesteps, full.timesteps[skipped:])
        as_sigmas = sampling_schedule(solver, 10, 4.5, strength)
        assert torch.equal(as_sigmas.sigmas, schedule.sigmas) and torch.equal(as_sigmas.timesteps, schedule.timesteps)


def test_trigflow_schedule_is_the_angles_as_flow_times():
    angles = trigflow_schedule(4)
    assert torch.equal(trigflow_angles(4), angles)
    assert torch.equal(trigflow_angles(4, 0.5), angles[2:])
    schedule = sampling_schedule("trigflow", 4, 99.0, 0.5)  # the shift does not apply to TrigFlow
    assert torch.equal(schedule.sigmas, flow_time_from_trigflow(angles[2:]))
    assert torch.equal(schedule.timesteps, schedule.sigmas[:-1]) and schedule.sigmas[-1] == 0


def test_schedule_choice_refuses_unknown_solvers_and_strengths():
    with pytest.raises(SanaInputError, match="unknown solver 'euler'"):
        sampling_schedule("euler", 10, 3.0)
    with pytest.raises(SanaInputError, match="unknown solver 'trigflow'; expected one of flow_dpm_solver, flow_euler"):
        flow_schedule("trigflow", 10, 3.0)
    with pytest.raises(SanaInputError, match="strength 0.0 "):
        sampling_schedule("flow_euler", 10, 3.0, 0.0)


def test_guided_context_has_one_block_per_branch_in_order():
    cond, cond_mask = torch.full((2, 3, 4), 1.0), torch.tensor([[1, 1, 0], [1, 0, 0]])
    uncond, uncond_mask = torch.full((2, 3, 4), -1.0), torch.tensor([[1, 0, 0], [1, 0, 0]])
    context, mask = guided_context(guidance_branches(4.5, 2.0), cond, cond_mask, uncond, uncond_mask)
    assert context.shape == (6, 3, 4) and mask.shape == (6, 3)
    assert torch.equal(context[:2], uncond) and torch.equal(context[2:4], cond) and torch.equal(context[4:], cond)
    assert torch.equal(mask, torch.cat([uncond_mask, cond_mask, cond_mask]))  # the perturbed rows see the prompt
    alone, alone_mask = guided_context(guidance_branches(1.0), cond, cond_mask)
    assert torch.equal(alone, cond) and torch.equal(alone_mask, cond_mask)
    with pytest.raises(SanaInputError, match="negative prompt"):
        guided_context(guidance_branches(4.5), cond, cond_mask)
