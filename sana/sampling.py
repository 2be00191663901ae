"""The sampling vocabulary: what `generate`, the ComfyUI nodes and the trainer share, each with one owner.

- the solver names (`FLOW_DPM_SOLVER`, `FLOW_EULER`, `TRIGFLOW`, `SOLVERS`) and `select_solver`,
  which solver a DiT samples with;
- `default_pag_layers`: the DiT blocks perturbed-attention guidance perturbs unless told;
- the schedule choice, (solver, steps, shift, denoising strength) -> schedule:
  `flow_schedule` (Flow-DPM-Solver / Flow-Euler sigmas and DiT timesteps), `trigflow_angles`
  (SANA-Sprint) and `sampling_schedule` (any solver's, as flow sigmas: ComfyUI's SIGMAS);
- `guided_context`: the text rows of a guided model call, one block per guidance branch;
- `control_steps` / `step_switched_velocity`: the steps a ControlNet acts on (diffusers' rule for
  a start and end fraction), and a velocity that takes the ControlNet only at those steps;
- `latents_to_images` / `images_to_latents`: the one way between latents and [0, 1] images
  (unscale, decode, map), with the DC-AE's tiling and progress passed through.

It sits above the models and the numerics that know no DiT (`sana.schedules`, `sana.samplers`)
and below `sana.pipeline`, which re-exports these names. The flow shift is not decided here: it
is the caller's value or the DiT config's `flow_shift`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from .dcae_tiling import TileProgress
from .dit import SanaDiT
from .errors import SanaInputError
from .resolution import resize_and_crop
from .samplers import COND, PERTURBED, UNCOND, VelocityFn, flow_time_from_trigflow, require_finite
from .schedules import (
    FlowSchedule,
    flow_dpm_schedule,
    flow_euler_schedule,
    img2img_start_step,
    trigflow_schedule,
)

FLOW_DPM_SOLVER = "flow_dpm_solver"
FLOW_EULER = "flow_euler"
TRIGFLOW = "trigflow"
SOLVERS = (FLOW_DPM_SOLVER, FLOW_EULER, TRIGFLOW)

# NVlabs' `pag_applied_layers` per released depth (Sana_1600M: 20 blocks, Sana_600M: 28).
# Other depths fall back to diffusers' SanaPAGPipeline default, block 0.
NVLABS_PAG_LAYERS: dict[int, tuple[int, ...]] = {20: (8,), 28: (14,)}
DIFFUSERS_PAG_LAYERS: tuple[int, ...] = (0,)


# ---------------------------------------------------------------------------------------
# Solver and guidance choices


def _check_solver(solver: str, allowed: Sequence[str] = SOLVERS) -> None:
    if solver not in allowed:
        raise SanaInputError(f"unknown solver {solver!r}; expected one of {', '.join(allowed)}")


def select_solver(dit: SanaDiT, solver: str | None) -> str:
    """The sampler for `dit`: `solver` if given, else TrigFlow for a guidance-embedded
    (SANA-Sprint) DiT and Flow-DPM-Solver for every other one.

    Raises `SanaInputError` for an unknown name, for TrigFlow on a DiT without a guidance
    embedding, and for a flow solver on a Sprint DiT (it is a consistency model over TrigFlow
    time, fed the flow time t in [0, 1] rather than 1000 sigma).
    """
    sprint = bool(dit.config.guidance_embeds)
    if solver is None:
        return TRIGFLOW if sprint else FLOW_DPM_SOLVER
    if solver not in SOLVERS:
        raise SanaInputError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)} (or None: automatic)")
    if solver == TRIGFLOW and not sprint:
        raise SanaInputError(
            f"solver 'trigflow' needs a SANA-Sprint DiT (guidance embedding); the DiT ({dit.config.variant}) has none: "
            f"use '{FLOW_DPM_SOLVER}' or '{FLOW_EULER}'"
        )
    if solver != TRIGFLOW and sprint:
        raise SanaInputError(
            f"the DiT ({dit.config.variant}) is a SANA-Sprint model (guidance embedding) and samples only with "
            f"'trigflow', not {solver!r}"
        )
    return solver


def default_pag_layers(dit: SanaDiT) -> tuple[int, ...]:
    """NVlabs' PAG layers for the released depths (block 8 of 20, block 14 of 28), else
    diffusers' default (block 0)."""
    return NVLABS_PAG_LAYERS.get(dit.config.depth, DIFFUSERS_PAG_LAYERS)


def guided_context(
    branches: Sequence[str],
    cond: torch.Tensor,
    cond_mask: torch.Tensor,
    uncond: torch.Tensor | None = None,
    uncond_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption batch of a guided model call: one block of B rows per entry of `branches`
    (`sana.samplers.guidance_branches` order), the prompt's for "cond" and for "perturbed"
    (PAG perturbs the self-attention, not the text), the negative prompt's for "uncond".

    Returns the context [len(branches)·B, L, D] and its mask [len(branches)·B, L], as the
    `model(x, t)` inside `guided_velocity` needs them.
    """
    texts = {COND: (cond, cond_mask), PERTURBED: (cond, cond_mask), UNCOND: (uncond, uncond_mask)}
    if UNCOND in branches and (uncond is None or uncond_mask is None):
        raise SanaInputError("classifier-free guidance needs the negative prompt's embedding and mask")
    context = torch.cat([texts[branch][0] for branch in branches])
    mask = torch.cat([texts[branch][1] for branch in branches])
    return context, mask


# ---------------------------------------------------------------------------------------
# Schedules


def flow_schedule(solver: str, steps: int, shift: float, strength: float = 1.0) -> FlowSchedule:
    """The Flow-DPM-Solver or Flow-Euler schedule of `steps` at flow `shift` (diffusers-exact
    sigmas and DiT timesteps, `sana.schedules`), cut for img2img at denoising `strength`
    (diffusers' rule; 1.0 keeps every step)."""
    _check_solver(solver, (FLOW_DPM_SOLVER, FLOW_EULER))
    build = flow_dpm_schedule if solver == FLOW_DPM_SOLVER else flow_euler_schedule
    return build(steps, shift).for_strength(strength)


def trigflow_angles(steps: int, strength: float = 1.0) -> torch.Tensor:
    """SANA-Sprint's TrigFlow angles for `steps`, cut for img2img at `strength` like the flow
    schedules (the first kept angle is where the image is noised to)."""
    return trigflow_schedule(steps)[img2img_start_step(steps, strength) :]


def sampling_schedule(solver: str, steps: int, shift: float, strength: float = 1.0) -> FlowSchedule:
    """Any solver's schedule in flow terms: the sigmas ComfyUI samples over plus the DiT's timesteps.

    flow_dpm_solver / flow_euler: `flow_schedule`. trigflow: the angles of `trigflow_angles` as
    flow times t = sin s / (sin s + cos s), which is what the DiT receives and what ComfyUI's
    flow noise scaling needs (a Sprint step is a flow step from x_t = (1 - t) x0 + t noise);
    `shift` does not apply to it.
    """
    _check_solver(solver)
    if solver == TRIGFLOW:
        times = flow_time_from_trigflow(trigflow_angles(steps, strength))
        return FlowSchedule(sigmas=times, timesteps=times[:-1])
    return flow_schedule(solver, steps, shift, strength)


# ---------------------------------------------------------------------------------------
# ControlNet steps


def control_steps(steps: int, start: float = 0.0, end: float = 1.0) -> range:
    """The sampling steps (from 0, of `steps` run) a ControlNet acts on for the fractions
    `start` < `end` in [0, 1]: step i when i / steps >= start and (i + 1) / steps <= end, the rule
    of diffusers' `control_guidance_start` / `control_guidance_end`."""
    active = [i for i in range(steps) if not (i / steps < start or (i + 1) / steps > end)]
    return range(active[0], active[-1] + 1) if active else range(0)


def step_switched_velocity(inside: VelocityFn, outside: VelocityFn, steps: range) -> VelocityFn:
    """A velocity function calling `inside` at the sampling steps in `steps` and `outside` at the
    others. It counts its calls, which is the step index because every sampler of
    `sana.samplers` calls its velocity once per step, in order; the count is a Python int, so a
    compiled `inside` or `outside` sees no changing value (no recompiles, no host sync)."""
    calls = 0

    def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        step, calls = calls, calls + 1
        return (inside if step in steps else outside)(x, timestep)

    return velocity


# ---------------------------------------------------------------------------------------
# Pixels <-> latents


class Autoencoder(Protocol):
    """What sampling needs from a DC-AE: `sana.dcae.DCAE` (`load_dcae`) is one."""

    scaling_factor: float
    spatial_compression: int
    latent_channels: int
    dtype: torch.dtype
    device: torch.device

    def encode(self, images: torch.Tensor, **tiling) -> torch.Tensor: ...  # [-1, 1] -> unscaled latents

    def decode(self, latents: torch.Tensor, **tiling) -> torch.Tensor: ...  # unscaled latents -> [-1, 1]


_DCAE_HINT = "check the DC-AE's weights, and run it in bfloat16 or float32"


def latents_to_images(
    dcae: Autoencoder,
    latents: torch.Tensor,
    height: int | None = None,
    width: int | None = None,
    *,
    scaled: bool = True,
    **tiling: int | TileProgress | None,
) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, H, W, 3] float32 in [0, 1] on the CPU.

    In diffusers' order: cast to the DC-AE's dtype and device; unscale (`scaled`: the latents
    are in the DiT's space, the DC-AE's times its `scaling_factor`, as every sampler returns
    them; False for raw DC-AE latents, ComfyUI's LATENT); decode, tiled when the image would not
    fit in memory or as `tiling` asks (`tile_size`, `tile_overlap`, `progress`: `DCAE.decode`'s);
    resize to cover `height` x `width` and centre-crop (`resize_and_crop`; None keeps the
    decoded size); then map [-1, 1] to [0, 1] in float32. NaN/inf pixels raise
    `SanaNonFiniteError` naming the decoding.
    """
    latents = latents.to(device=dcae.device, dtype=dcae.dtype)
    if scaled:
        latents = latents / dcae.scaling_factor
    decoded = dcae.decode(latents, **tiling)
    decoded = require_finite(decoded, "decoding (DC-AE decode)", _DCAE_HINT)
    if height is not None and width is not None:
        decoded = resize_and_crop(decoded, height, width)
    return (decoded.float() / 2 + 0.5).clamp(0, 1).movedim(1, -1).cpu()


def images_to_latents(
    dcae: Autoencoder,
    images: torch.Tensor,
    height: int | None = None,
    width: int | None = None,
    *,
    scaled: bool = True,
    **tiling: int | TileProgress | None,
) -> torch.Tensor:
    """Images [B, H, W, 3] (or [H, W, 3]) in [0, 1] -> float32 latents on the DC-AE's device.

    An image of another size than `height` x `width` is resized with bilinear interpolation
    (align_corners=False), as diffusers' Sprint img2img pipeline does with a tensor input; no
    crop, so a different aspect ratio is stretched (None keeps the size: it must then be a
    multiple of the DC-AE's compression). `scaled`: return the latents in the DiT's space (times
    `scaling_factor`); False: the raw DC-AE latents. `tiling` as in `DCAE.encode`.
    NaN/inf latents raise `SanaNonFiniteError` naming the image encoding.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise SanaInputError(f"image must be [B, H, W, 3] in [0, 1] (ComfyUI IMAGE), got shape {list(images.shape)}")
    pixels = images.movedim(-1, 1).float()
    if height is not None and width is not None and tuple(pixels.shape[-2:]) != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
    pixels = (pixels * 2 - 1).to(device=dcae.device, dtype=dcae.dtype)
    latents = dcae.encode(pixels, **tiling)
    latents = require_finite(latents, "image encoding (DC-AE encode)", _DCAE_HINT)
    return (latents * dcae.scaling_factor if scaled else latents).float()


__all__ = [
    "Autoencoder",
    "DIFFUSERS_PAG_LAYERS",
    "FLOW_DPM_SOLVER",
    "FLOW_EULER",
    "NVLABS_PAG_LAYERS",
    "SOLVERS",
    "TRIGFLOW",
    "control_steps",
    "default_pag_layers",
    "flow_schedule",
    "guided_context",
    "images_to_latents",
    "latents_to_images",
    "sampling_schedule",
    "select_solver",
    "step_switched_velocity",
    "trigflow_angles",
]
