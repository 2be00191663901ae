"""Sigma and timestep tables for the SANA samplers.

Every table here is built with the same number types and the same order of operations
as the diffusers schedulers the project treats as its numerical reference, because a
one-ulp difference in a sigma moves the integer timestep the DiT sees (floor(1000*sigma))
and the whole trajectory with it:

- `flow_dpm_schedule`  == `DPMSolverMultistepScheduler(use_flow_sigmas=True,
  prediction_type="flow_prediction", flow_shift=shift)` (float64 numpy grid, float32 sigmas,
  int64 timesteps truncated from 1000*sigma);
- `flow_euler_schedule` == `FlowMatchEulerDiscreteScheduler(shift=shift)` (float timesteps,
  and sigma_min shifted twice, as diffusers does);
- `trigflow_schedule`  == `SCMScheduler.set_timesteps` (SANA-Sprint, TrigFlow angles).

Flow convention: x_sigma = (1 - sigma) * x0 + sigma * noise; the model predicts v = noise - x0.

Accepted values (else `SanaInputError` naming the value): 1 to `MAX_STEPS` steps; a flow shift in
[`MIN_FLOW_SHIFT`, `MAX_FLOW_SHIFT`]; an img2img strength in [0, 1]. The shift has no default
here: the shift a model was trained with is its config's `flow_shift` (`sana.dit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import SanaInputError, check_integer, check_number

NUM_TRAIN_TIMESTEPS = 1000

TRIGFLOW_MAX_TIMESTEP = 1.57080
TRIGFLOW_INTERMEDIATE_TIMESTEP = 1.3
TRIGFLOW_SIGMA_DATA = 0.5

# Step counts above this are refused: the tables are built in memory up front (10^9 steps would
# allocate gigabytes before the first step), and the ComfyUI nodes' steps widgets stop here too.
MAX_STEPS = 10_000
# The trained shifts are 3 and 6. Far outside this range float32 sigmas collapse onto 1 (shift
# 10^5 and up: the log-SNR of Flow-DPM-Solver is then infinite) or onto 0 (tiny shifts: every
# DiT timestep truncates to 0). 100 is also the top of ComfyUI's ModelSampling nodes.
MIN_FLOW_SHIFT = 0.01
MAX_FLOW_SHIFT = 100.0


def _check_steps(num_steps: int) -> None:
    check_integer("num_steps", num_steps, low=1, high=MAX_STEPS)


def _check_shift(shift: float) -> None:
    check_number("flow shift", shift, low=MIN_FLOW_SHIFT, high=MAX_FLOW_SHIFT)


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching sampling schedule.

    `sigmas` is float32 [n+1], descending, ending at exactly 0. `timesteps` is [n]: the value
    the DiT receives at each model evaluation (int64 for Flow-DPM-Solver, float32 for
    Flow-Euler, both exactly as diffusers hands them to `SanaTransformer2DModel`).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def for_strength(self, strength: float) -> FlowSchedule:
        """The tail of this schedule that img2img runs at denoising `strength` in (0, 1].

        The cut is diffusers' `get_timesteps`: skip int(n - min(n*strength, n)) steps. The
        float product is kept as is (0.7 * 20 = 14.000000000000002 skips 5 steps, not 6)
        so step counts agree with diffusers' img2img pipelines.
        """
        start = img2img_start_step(self.num_steps, strength)
        return FlowSchedule(sigmas=self.sigmas[start:], timesteps=self.timesteps[start:])


def img2img_start_step(num_steps: int, strength: float) -> int:
    """How many leading steps img2img skips at denoising `strength` (diffusers' rule).

    Raises `SanaInputError` when `strength` leaves no step to run.
    """
    _check_steps(num_steps)
    check_number("denoise strength", strength, low=0.0, high=1.0)
    kept = min(num_steps * strength, num_steps)
    start = int(max(num_steps - kept, 0))
    if num_steps - start < 1:
        raise SanaInputError(
            f"denoise strength {strength} with {num_steps} steps leaves no step to run; raise the strength or the steps"
        )
    return start


def flow_dpm_schedule(num_steps: int, shift: float) -> FlowSchedule:
    """Flow-DPM-Solver schedule; equal to diffusers' DPMSolverMultistepScheduler flow tables.

    sigma = shift*s / (1 + (shift-1)*s) on s = 1 - linspace(1, 1/1000, n+1), flipped, the final
    grid point replaced by 0. The grid is float64 (numpy) and rounded to float32 once at the
    end; timesteps truncate 1000*sigma (float64) to int64.
    """
    _check_steps(num_steps)
    _check_shift(shift)
    grid = 1.0 - np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, num_steps + 1)
    shifted = np.flip(shift * grid / (1 + (shift - 1) * grid))[:-1].copy()
    timesteps = torch.from_numpy(shifted * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float32))
    return FlowSchedule(sigmas=sigmas, timesteps=timesteps)


def flow_euler_schedule(num_steps: int, shift: float) -> FlowSchedule:
    """Flow-Euler schedule; equal to diffusers' FlowMatchEulerDiscreteScheduler(shift=shift).

    diffusers shifts its 1000-entry training table at construction (in float32) and takes
    sigma_min from it, then shifts the inference grid again, so the last sigma before 0 is
    the *doubly* shifted 0.001 (about 0.0089 at shift 3). That is reproduced here.
    """
    _check_steps(num_steps)
    _check_shift(shift)
    train_ends = torch.tensor([NUM_TRAIN_TIMESTEPS, 1], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    train_ends = shift * train_ends / (1 + (shift - 1) * train_ends)
    sigma_max, sigma_min = train_ends[0].item(), train_ends[1].item()
    grid = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
    grid = grid / NUM_TRAIN_TIMESTEPS
    shifted = torch.from_numpy(shift * grid / (1 + (shift - 1) * grid)).to(torch.float32)
    timesteps = shifted * NUM_TRAIN_TIMESTEPS
    sigmas = torch.cat([shifted, torch.zeros(1, dtype=torch.float32)])
    return FlowSchedule(sigmas=sigmas, timesteps=timesteps)


def trigflow_schedule(
    num_steps: int,
    *,
    max_timestep: float = TRIGFLOW_MAX_TIMESTEP,
    intermediate_timestep: float | None = TRIGFLOW_INTERMEDIATE_TIMESTEP,
    timesteps: list[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """SANA-Sprint TrigFlow angles s_0 > ... > s_n = 0 (float32 [n+1]); equal to SCMScheduler.

    Two steps use [max, intermediate, 0]; any other count uses linspace(max, 0, n+1).
    `intermediate_timestep` is ignored unless n == 2 (NVlabs' fallback; diffusers raises
    instead, so pass None there for parity). A custom `timesteps` sequence must have n+1
    entries and replaces the rule.
    """
    _check_steps(num_steps)
    if timesteps is not None:
        if len(timesteps) != num_steps + 1:
            raise SanaInputError(
                f"custom TrigFlow timesteps must have num_steps + 1 = {num_steps + 1} entries, got {len(timesteps)}"
            )
        if isinstance(timesteps, torch.Tensor):
            return timesteps.detach().to("cpu").float()
        return torch.tensor(list(timesteps)).float()
    if num_steps == 2 and intermediate_timestep is not None:
        return torch.tensor([max_timestep, intermediate_timestep, 0]).float()
    return torch.linspace(max_timestep, 0, num_steps + 1).float()
