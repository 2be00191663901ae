"""The Sana samplers in ComfyUI's KSAMPLER convention (no ComfyUI imported).

`sampler_function(solver)` returns `sample(model, x, sigmas, extra_args, callback, disable)`
around the one implementation of each solver in `sana.samplers`; the schedules come from
`sana.sampling.sampling_schedule`, the same choice `sana.generate` makes. ComfyUI's model
returns the denoised x0, so the velocity the solvers drive is v = (x - x0) / sigma.

Two transformer_options keys carry what ComfyUI's calling convention has no room for; the DiT
adapter (`comfy_model.SanaDiffusionModel`) reads them: `DIT_TIMESTEP_KEY` (Flow-DPM-Solver's
integer timestep) and `PAG_LAYERS_KEY` (the blocks PAG perturbs). `check_sampler_inputs` holds
the sampler widgets to `sana.generate`'s bounds (ComfyUI's own min/max lets NaN through), and
NaN/inf trajectories raise `SanaNonFiniteError` instead of decoding to black images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..sana.errors import SanaInputError
from ..sana.pipeline import check_sampling_values
from ..sana.samplers import NonFiniteWatch, draw_noise, flow_dpm_solver, flow_euler, trigflow_sampler
from ..sana.sampling import FLOW_DPM_SOLVER, FLOW_EULER, TRIGFLOW
from ..sana.schedules import TRIGFLOW_SIGMA_DATA, FlowSchedule

# transformer_options keys the samplers and the PAG patch set, and the DiT adapter reads.
DIT_TIMESTEP_KEY = "sana_dit_timestep"  # the exact timestep value the DiT gets this call
PAG_LAYERS_KEY = "sana_pag_layers"  # blocks whose self-attention is the identity this call

ComfyCallback = Callable[[dict[str, Any]], None]


def _comfy_callback(callback: ComfyCallback | None, sigmas: torch.Tensor):
    if callback is None:
        return None

    def step_done(i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})

    return step_done


def _with_transformer_option(extra_args: dict, key: str, value: Any) -> dict:
    """A copy of `extra_args` whose model_options.transformer_options has `key` = `value`
    (copies, never mutating what ComfyUI passed in)."""
    model_options = dict(extra_args.get("model_options", {}))
    model_options["transformer_options"] = {**model_options.get("transformer_options", {}), key: value}
    return {**extra_args, "model_options": model_options}


def dpm_dit_timestep(sigma: float) -> float:
    """⌊1000 σ⌋, the integer timestep diffusers' Flow-DPM-Solver hands the DiT, from a float32 sigma.

    Computed in float64 from the float32 sigma; equal to diffusers' table for every step count
    1-100 and shift 0.5-12 except shift 1.0, where diffusers' own float64 grid lands a hair below
    some integers. Pass the schedule's table (`dit_timesteps`) to be exact there too."""
    return float(math.floor(float(sigma) * 1000.0))


_SAMPLING_HINT = "check the model's (and any LoRA's) weights and dtype, cfg, and the input latent"


def check_sampler_inputs(*, steps: int, flow_shift: float, denoise: float, seed: int = 0, cfg: float = 1.0,
                         pag_scale: float = 0.0) -> None:
    """The Sana KSampler's and Sana Sigmas' widgets, held to `sana.generate`'s bounds
    (`SanaInputError` naming the widget): ComfyUI's own min/max check lets NaN through.
    flow_shift 0 means auto."""
    check_sampling_values(
        seed=seed, steps=steps, guidance_scale=cfg, flow_shift=flow_shift if flow_shift != 0 else None,
        pag_scale=pag_scale, strength=denoise, names={"guidance_scale": "cfg", "strength": "denoise"},
    )


def flow_sampler_function(solver: str, dit_timesteps: torch.Tensor | None = None):
    """A ComfyUI sampler function running `sana.samplers.flow_dpm_solver` or `flow_euler`.

    ComfyUI's `model(x, sigma, **extra_args)` returns the denoised x0; the flow velocity is
    v = (x - x0) / sigma. For Flow-DPM-Solver the DiT must see diffusers' integer timesteps, so
    each call carries that value in transformer_options[DIT_TIMESTEP_KEY] (from `dit_timesteps`,
    aligned with the sigmas, when given; else ⌊1000 σ⌋). Flow-Euler uses ComfyUI's σ·1000.
    """
    if solver not in (FLOW_DPM_SOLVER, FLOW_EULER):
        raise SanaInputError(f"flow_sampler_function takes {FLOW_DPM_SOLVER} or {FLOW_EULER}, not {solver!r}")
    solve = flow_dpm_solver if solver == FLOW_DPM_SOLVER else flow_euler

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        sigmas = sigmas.to(device=x.device, dtype=torch.float32)
        table: dict[float, float] = {}
        if solver == FLOW_DPM_SOLVER:
            given = dit_timesteps.tolist() if dit_timesteps is not None and len(dit_timesteps) == len(sigmas) - 1 else None
            for i, sigma in enumerate(sigmas[:-1].tolist()):
                table[sigma] = float(given[i]) if given is not None else dpm_dit_timestep(sigma)

        def velocity(xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            args = extra_args
            if table:
                args = _with_transformer_option(extra_args, DIT_TIMESTEP_KEY, table[float(sigma[0])])
            denoised = model(xt, sigma, **args)
            return (xt - denoised.float()) / sigma.view(-1, *([1] * (xt.ndim - 1)))

        # The schedule's "timesteps" are the sigmas themselves: the velocity needs the sigma to
        # call ComfyUI's model; the DiT's own timestep travels through transformer_options.
        schedule = FlowSchedule(sigmas=sigmas, timesteps=sigmas[:-1])
        watch = NonFiniteWatch(_comfy_callback(callback, sigmas))
        return watch.check(solve(velocity, x, schedule, callback=watch), f"Sana sampling ({solver})", _SAMPLING_HINT)

    return sample


def sprint_sampler_function(sigma_data: float = TRIGFLOW_SIGMA_DATA):
    """A ComfyUI sampler function running SANA-Sprint's `sana.samplers.trigflow_sampler`.

    The sigmas are flow times t (from `sana.sampling.sampling_schedule("trigflow", ...)`). In flow terms a TrigFlow
    step is: predict x0 = x_t - t v, then re-noise to x_t' = (1 - t') x0 + t' noise' with fresh
    noise. The fresh noise comes from a CPU generator seeded with the sampling seed, advanced past
    the initial noise ComfyUI drew from the same seed, so the sequence equals `sana.generate`'s.
    """

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        times = sigmas.to(device=x.device, dtype=torch.float32)
        angles = torch.atan2(times, 1 - times)  # tan s = t / (1 - t)
        seed = extra_args.get("seed")
        generator = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
        draw_noise(x.shape, generator, "cpu")  # ComfyUI's initial noise: same seed, same draw
        t0 = times[0]
        # x_t = (1 - t) x0 + t noise  <->  TrigFlow x = sigma_data (cos s x0 + sin s noise) = sigma_data x_t / r(t)
        start = x.float() * sigma_data / torch.sqrt(t0**2 + (1 - t0) ** 2)

        def velocity(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            denoised = model(xt, t, **extra_args)
            return (xt - denoised.float()) / t.view(-1, *([1] * (xt.ndim - 1)))

        watch = NonFiniteWatch(_comfy_callback(callback, times))
        result = trigflow_sampler(velocity, start, angles, generator=generator, sigma_data=sigma_data, callback=watch)
        return watch.check(result, f"Sana sampling ({TRIGFLOW})", _SAMPLING_HINT)

    return sample


def sampler_function(solver: str, dit_timesteps: torch.Tensor | None = None):
    """The ComfyUI sampler function for a solver name (see `SOLVERS`)."""
    if solver == TRIGFLOW:
        return sprint_sampler_function()
    return flow_sampler_function(solver, dit_timesteps)


def pag_denoised(denoised: torch.Tensor, cond_denoised: torch.Tensor, perturbed_denoised: torch.Tensor, scale: float) -> torch.Tensor:
    """Perturbed-attention guidance in x0 space: denoised + s (x0_cond - x0_perturbed).

    Equal to sana's velocity form v + s (v_cond - v_perturbed), because x0 = x - sigma v is affine in v."""
    return denoised + scale * (cond_denoised - perturbed_denoised)


__all__ = [
    "DIT_TIMESTEP_KEY",
    "PAG_LAYERS_KEY",
    "check_sampler_inputs",
    "dpm_dit_timestep",
    "flow_sampler_function",
    "pag_denoised",
    "sampler_function",
    "sprint_sampler_function",
]
