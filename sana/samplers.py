"""Samplers for SANA (Flow-DPM-Solver, Flow-Euler) and SANA-Sprint (TrigFlow / sCM).

Every sampler drives a *velocity function* and knows nothing about the DiT:

    velocity(x: Tensor[B, C, h, w] float32, timestep: Tensor[B] float32) -> v

`timestep` carries exactly the values diffusers gives `SanaTransformer2DModel` (int-valued
1000*sigma for DPM, float 1000*sigma for Euler, the flow time t in [0, 1] for Sprint), so a
caller can pass it straight to the DiT. Guidance is composed *outside* the solvers with
`guided_velocity`, which turns a batched model call into a velocity function; the same
solver code therefore serves the pipeline, PAG and the ComfyUI nodes.

All arithmetic is float32 with the same operation order as the diffusers schedulers, so
results agree with a loop over `scheduler.step` to float32 round-off (in practice exactly).

`NonFiniteWatch` is the step callback that catches a trajectory going NaN/inf without a host
sync per step; `require_finite` checks one stage's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import SanaInputError, SanaNonFiniteError
from .schedules import TRIGFLOW_SIGMA_DATA, FlowSchedule

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(latents [B,C,h,w] float32, timestep [B] float32) -> velocity [B,C,h,w]."""

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""(step index, latents after the step, current x0 prediction) -> None; e.g. previews."""

UNCOND = "uncond"
COND = "cond"
PERTURBED = "perturbed"


# ---------------------------------------------------------------------------------------
# Guidance


def uses_cfg(guidance_scale: float) -> bool:
    """Classifier-free guidance runs only for scale > 1 (diffusers' rule; scale <= 1 means
    a single conditional pass, not extrapolation towards the negative prompt)."""
    return guidance_scale > 1.0


def uses_pag(pag_scale: float) -> bool:
    """Perturbed-attention guidance runs for pag_scale > 0 (diffusers' SanaPAGPipeline)."""
    return pag_scale > 0.0


def guidance_branches(guidance_scale: float, pag_scale: float = 0.0) -> tuple[str, ...]:
    """The batch layout a guided model call expects, in order, each chunk B samples long.

    ("cond",), ("uncond", "cond"), ("cond", "perturbed") or ("uncond", "cond", "perturbed").
    The caller builds the context / mask batch in this order; the "perturbed" chunk gets the
    prompt's context and identity self-attention in the PAG layers.
    """
    branches = [COND]
    if uses_cfg(guidance_scale):
        branches.insert(0, UNCOND)
    if uses_pag(pag_scale):
        branches.append(PERTURBED)
    return tuple(branches)


def pag_scale_at(pag_scale: float, pag_adaptive_scale: float, timestep: float | torch.Tensor) -> float | torch.Tensor:
    """PAG scale at a (0..1000) timestep: pag_scale - adaptive*(1000 - t), floored at 0.

    With `pag_adaptive_scale == 0` (the default) the scale is the constant `pag_scale`. The
    adaptive value is a float32 scalar tensor because diffusers computes it from the timestep
    tensor in float32; a Python double would differ in the last bits.
    """
    if pag_adaptive_scale > 0 and pag_scale > 0:
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(())
        return (pag_scale - pag_adaptive_scale * (1000 - t)).clamp_min(0.0)
    return pag_scale


def combine_guidance(
    v_cond: torch.Tensor,
    *,
    v_uncond: torch.Tensor | None = None,
    v_perturbed: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    pag_scale: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """The guided velocity: v_u + w (v_c - v_u) + s_pag (v_c - v_ptb), each term only when
    its branch is present. Computed in float32.

    CFG on v equals NVlabs' CFG on eps because eps = x + (1 - sigma) v is affine in v.
    """
    v_cond = v_cond.float()
    if v_uncond is None:
        guided = v_cond
    else:
        v_uncond = v_uncond.float()
        guided = v_uncond + guidance_scale * (v_cond - v_uncond)
    if v_perturbed is not None:
        guided = guided + pag_scale * (v_cond - v_perturbed.float())
    return guided


def guided_velocity(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    guidance_scale: float,
    pag_scale: float = 0.0,
    pag_adaptive_scale: float = 0.0,
) -> VelocityFn:
    """Wrap a batched model call into a guided velocity function.

    `model(x_batched, timestep_batched)` receives the latents repeated once per entry of
    `guidance_branches(guidance_scale, pag_scale)` (chunked along dim 0, in that order) and
    the timestep expanded to the same batch; it returns the raw velocities for that batch.
    """
    branches = guidance_branches(guidance_scale, pag_scale)

    def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        copies = len(branches)
        x_in = torch.cat([x] * copies) if copies > 1 else x
        t_in = timestep.repeat(copies) if copies > 1 else timestep
        chunks = dict(zip(branches, model(x_in, t_in).float().chunk(copies)))
        scale = pag_scale_at(pag_scale, pag_adaptive_scale, timestep[0]) if PERTURBED in chunks else 0.0
        return combine_guidance(
            chunks[COND],
            v_uncond=chunks.get(UNCOND),
            v_perturbed=chunks.get(PERTURBED),
            guidance_scale=guidance_scale,
            pag_scale=scale,
        )

    return velocity


# ---------------------------------------------------------------------------------------
# Noise


def draw_noise(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn the way diffusers' `randn_tensor` draws it.

    A CPU generator with another target device draws on the CPU and moves the result; a
    list of generators draws one sample per generator. Same seed => same noise as diffusers.
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    draw_device = device
    if generator is not None:
        generator_device = (generator[0] if isinstance(generator, list) else generator).device
        if generator_device.type != device.type:
            if generator_device.type != "cpu":
                raise SanaInputError(
                    f"cannot draw {device} noise from a generator on {generator_device}; "
                    f"use a CPU generator or one on {device}"
                )
            draw_device = torch.device("cpu")
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise SanaInputError(f"got {len(generator)} generators for a batch of {shape[0]}")
        samples = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(samples).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def add_flow_noise(clean_latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise: the img2img starting point at `sigma`
    (pass `schedule.for_strength(s).sigmas[0]`)."""
    sigma = torch.as_tensor(sigma, dtype=clean_latents.dtype, device=clean_latents.device)
    return (1 - sigma) * clean_latents + sigma * noise


# ---------------------------------------------------------------------------------------
# Flow-DPM-Solver (DPM-Solver++, order 2, multistep, midpoint) and Flow-Euler


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    # lambda = log(alpha) - log(sigma) with alpha = 1 - sigma (flow schedule).
    return torch.log(1 - sigma) - torch.log(sigma)


def flow_dpm_solver(
    velocity: VelocityFn,
    latents: torch.Tensor,
    schedule: FlowSchedule,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Flow-DPM-Solver: DPM-Solver++(2M), midpoint, on a velocity model (x0 = x - sigma v).

    One model evaluation per schedule step. The first step is first order (no history);
    the last goes to sigma = 0 with first order, which returns that step's x0 exactly;
    every step between is the multistep second-order update. A truncated (img2img)
    schedule starts over with a first-order step, as diffusers does with `set_begin_index`.
    Returns float32 latents at sigma = 0.
    """
    sigmas = schedule.sigmas  # host-side: the branches below read them without a device sync
    x = latents.float()
    batch = x.shape[0]
    timesteps = schedule.timesteps.to(device=x.device, dtype=torch.float32)  # one copy, not one per step
    previous_x0: torch.Tensor | None = None
    for i in range(schedule.num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, timesteps[i].expand(batch)).float()
        x0 = x - sigma * v
        if sigma_next == 0:
            # alpha=1, sigma=0: the first-order update's x coefficient vanishes and it returns
            # x0 itself; taking it directly avoids log(0) = -inf arithmetic.
            x = x0
        else:
            alpha_next = 1 - sigma_next
            lambda_now, lambda_next = _log_snr(sigma), _log_snr(sigma_next)
            h = lambda_next - lambda_now
            x0_weight = alpha_next * (torch.exp(-h) - 1.0)
            if previous_x0 is None:
                x = (sigma_next / sigma) * x - x0_weight * x0
            else:
                r = (lambda_now - _log_snr(sigmas[i - 1])) / h
                x0_slope = (1.0 / r) * (x0 - previous_x0)
                x = (sigma_next / sigma) * x - x0_weight * x0 - 0.5 * x0_weight * x0_slope
        previous_x0 = x0
        if callback is not None:
            callback(i, x, x0)
    return x


def flow_euler(
    velocity: VelocityFn,
    latents: torch.Tensor,
    schedule: FlowSchedule,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Flow-Euler: x <- x + (sigma_next - sigma) v. Returns float32 latents at sigma = 0."""
    sigmas = schedule.sigmas
    x = latents.float()
    batch = x.shape[0]
    timesteps = schedule.timesteps.to(device=x.device, dtype=torch.float32)
    for i in range(schedule.num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, timesteps[i].expand(batch)).float()
        x_next = x + (sigma_next - sigma) * v
        if callback is not None:
            callback(i, x_next, x - sigma * v)
        x = x_next
    return x


# ---------------------------------------------------------------------------------------
# Non-finite results


def require_finite(tensor: torch.Tensor, stage: str, hint: str = "") -> torch.Tensor:
    """`tensor` itself when every value is finite; else `SanaNonFiniteError` naming `stage`
    (what produced it) and `hint` (what to check). One host sync: call it once per stage."""
    if not bool(torch.isfinite(tensor).all()):
        raise SanaNonFiniteError(f"{stage} produced NaN/inf values" + (f"; {hint}" if hint else ""))
    return tensor


class NonFiniteWatch:
    """A sampler step callback (wrapping `callback`, if any) that records on the device whether
    each step left the latents finite. The samplers never wait on the host, and neither does
    this: `check` reads every flag at once after the loop and names the first bad step."""

    def __init__(self, callback: StepCallback | None = None):
        self.callback = callback
        self._finite: list[torch.Tensor] = []

    def __call__(self, step: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        self._finite.append(torch.isfinite(x).all())
        if self.callback is not None:
            self.callback(step, x, x0)

    def check(self, final: torch.Tensor, stage: str = "denoising", hint: str = "") -> torch.Tensor:
        """`final` (the sampler's result) when it and every step were finite; else
        `SanaNonFiniteError` naming `stage` and the first step (from 1) that was not."""
        finite = torch.stack([*self._finite, torch.isfinite(final).all()]).cpu()  # the one host sync
        if bool(finite.all()):
            return final
        first = int((~finite).nonzero()[0])
        steps = len(self._finite)
        where = f" at step {first + 1} of {steps}" if first < steps else ""
        raise SanaNonFiniteError(f"{stage} produced NaN/inf latents{where}" + (f"; {hint}" if hint else ""))


# ---------------------------------------------------------------------------------------
# SANA-Sprint: TrigFlow / sCM few-step sampler


def flow_time_from_trigflow(angle: torch.Tensor) -> torch.Tensor:
    """Flow time t = sin s / (sin s + cos s) of a TrigFlow angle s (what the DiT receives)."""
    return torch.sin(angle) / (torch.cos(angle) + torch.sin(angle))


def trigflow_start_latents(
    noise: torch.Tensor,
    *,
    image_latents: torch.Tensor | None = None,
    first_angle: torch.Tensor | float | None = None,
    sigma_data: float = TRIGFLOW_SIGMA_DATA,
) -> torch.Tensor:
    """TrigFlow starting point from standard-normal `noise`.

    Text-to-image: noise * sigma_data. Img2img: cos(s0) * (image_latents * sigma_data) +
    sin(s0) * noise * sigma_data, with `image_latents` the VAE latents times the VAE's
    scaling factor (the DiT's input space) and s0 the first angle of the cut schedule.
    """
    if image_latents is None:
        return noise.float() * sigma_data
    if first_angle is None:
        raise SanaInputError("TrigFlow img2img needs first_angle, the first angle of the cut schedule")
    angle = torch.as_tensor(first_angle, dtype=torch.float32).reshape(1).to(image_latents.device)
    scaled_image = image_latents.float() * sigma_data
    return torch.cos(angle) * scaled_image + torch.sin(angle) * (noise.float() * sigma_data)


def trigflow_sampler(
    velocity: VelocityFn,
    latents: torch.Tensor,
    angles: torch.Tensor,
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sigma_data: float = TRIGFLOW_SIGMA_DATA,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """SANA-Sprint sCM sampling over TrigFlow `angles` [n+1] (from `trigflow_schedule`,
    cut with `[img2img_start_step(n, strength):]` for img2img).

    `latents` is the TrigFlow-space start (`trigflow_start_latents`). Per step: the DiT sees
    x / sigma_data * sqrt(t^2 + (1-t)^2) and the flow time t; its velocity becomes the
    TrigFlow prediction, x0 = cos(s) x - sin(s) F, and the next state is
    cos(s') x0 + sin(s') * noise * sigma_data with fresh noise drawn from `generator` every
    step, the last included, exactly in diffusers' order (so the same generator gives the
    same images). Embedded guidance is the velocity function's business (one pass, no CFG).
    Returns x0 / sigma_data: latents in the DiT's space, ready for the VAE decode.
    """
    x = latents.float()
    batch = x.shape[0]
    # diffusers keeps the SCM angles on the latents' device; trig there gives the same values.
    angles = angles.to(x.device)
    steps = int(angles.shape[0]) - 1
    # Drawn before the loop, in the order the loop uses them (the generator serves nothing else),
    # so that no step waits on a host-to-device copy.
    step_noise = [draw_noise(x.shape, generator, x.device) for _ in range(steps)]
    x0 = x
    for i in range(steps):
        angle, angle_next = angles[i], angles[i + 1]
        t = flow_time_from_trigflow(angle.expand(batch))
        t4 = t.view(-1, 1, 1, 1)
        norm = torch.sqrt(t4**2 + (1 - t4) ** 2)
        x_model = (x / sigma_data) * norm
        v = velocity(x_model, t).float()
        prediction = ((1 - 2 * t4) * x_model + (1 - 2 * t4 + 2 * t4**2) * v) / norm
        prediction = prediction * sigma_data
        x0 = torch.cos(angle) * x - torch.sin(angle) * prediction
        noise = step_noise[i] * sigma_data
        x = torch.cos(angle_next) * x0 + torch.sin(angle_next) * noise
        if callback is not None:
            callback(i, x, x0 / sigma_data)
    return x0 / sigma_data


__all__ = [
    "COND",
    "NonFiniteWatch",
    "PERTURBED",
    "UNCOND",
    "StepCallback",
    "VelocityFn",
    "add_flow_noise",
    "combine_guidance",
    "draw_noise",
    "flow_dpm_solver",
    "flow_euler",
    "flow_time_from_trigflow",
    "guidance_branches",
    "guided_velocity",
    "pag_scale_at",
    "require_finite",
    "trigflow_sampler",
    "trigflow_start_latents",
    "uses_cfg",
    "uses_pag",
]
