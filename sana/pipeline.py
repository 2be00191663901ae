"""Text-to-image and image-to-image with SANA, SANA-1.5 and SANA-Sprint: `generate`.

`generate` wires the loaded parts together (Gemma-2 text encoder, DiT, DC-AE) with the
sampling vocabulary of `sana.sampling` (solvers, schedules, guided context, latents <-> images)
and the solvers of `sana.samplers`; it holds no numerics of its own beyond the glue. With the
same initial noise it reproduces diffusers' `SanaPipeline` (Flow-DPM-Solver, Flow-Euler),
`SanaPAGPipeline` (PAG), `SanaSprintPipeline` and `SanaSprintImg2ImgPipeline` (TrigFlow), which
`tests/test_pipeline.py` checks, and `SanaControlNetPipeline` (a ControlNet steering the DiT),
which `tests/test_controlnet_pipeline.py` checks.

Images go in and come out in ComfyUI's IMAGE convention: float [B, H, W, 3] in [0, 1].

`generate` runs these stages in order, each a function of this module that can be called and
tested on its own:
1. `check_generation_inputs` -> `GenerationPlan`: every argument and the fit of the parts are
   checked before any compute (numbers finite and in range, sizes, seeds, latents, images,
   caption and latent channels, a memory estimate of the decoded images), so a bad request
   fails in milliseconds with the argument or both sides named; the plan settles the solver,
   the sizes, the guidance branches, the PAG layers and the flow shift (the request's, else the
   DiT config's). `guided_pag` then perturbs the PAG layers for the whole generation;
2. `encode_prompts` on the compute device (the DiT's), after which the text encoder leaves it:
   Gemma-2-2B is not needed again and its memory goes to the DiT and the decode;
   `image_latents` encodes the img2img image and the ControlNet's control image;
3. `seeded_generator`, `initial_noise`: the noise comes from a CPU generator, so a seed gives
   the same image on every device, and the same as diffusers with `torch.Generator("cpu")`;
   a list of seeds, one per image, gives each image its own generator (diffusers' list of
   generators), so an image depends on its own seed and not on the batch it is drawn in;
4. `denoise_flow` over `flow_schedule(...)` (with a ControlNet: its `Control`) or
   `denoise_trigflow` over `trigflow_angles(...)`;
5. `latents_to_images`: decode with the DC-AE, which tiles by itself when the image would not
   fit in memory, and resize-and-crop back from the resolution bin to the requested size.
Each stage checks its output once (`SanaNonFiniteError` naming the text encoding, the image
encoding, the denoising step, or the decoding that produced NaN/inf), so a broken weight, LoRA
or dtype never comes back as a black image.

The sampling loop never waits on the host: padded caption columns are trimmed once before it
(`trim_padded_context`), the schedule goes to the device once, Sprint's per-step noise is drawn
up front, and with `compile_model` each step's model evaluation (the CFG/PAG batch through the
DiT and the guidance combine) is one `torch.compile` graph (`fullgraph=True`; CUDA graphs on GPU).
Compiled, the caption keeps its fixed padded length instead of being trimmed, so one graph
serves every prompt of a size and batch. The denoising check keeps it so: each step appends a
device-side "still finite" flag (`NonFiniteWatch`), read once after the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .controlnet import SanaControlNet, check_controlnet_fits
from .dcae_tiling import default_memory_budget
from .dit import SanaDiT, perturbed_self_attention, trim_padded_context
from .errors import SanaCheckpointError, SanaInputError, check_integer, check_number
from .resolution import BINS_BY_SAMPLE_SIZE, MAX_IMAGE_SIDE, check_image_size, closest_bin, nearest_multiple
from .samplers import (
    PERTURBED,
    UNCOND,
    NonFiniteWatch,
    add_flow_noise,
    draw_noise,
    flow_dpm_solver,
    flow_euler,
    guidance_branches,
    guided_velocity,
    require_finite,
    trigflow_sampler,
    trigflow_start_latents,
    uses_pag,
)
from .sampling import (
    DIFFUSERS_PAG_LAYERS,
    FLOW_DPM_SOLVER,
    FLOW_EULER,
    NVLABS_PAG_LAYERS,
    SOLVERS,
    TRIGFLOW,
    Autoencoder,
    control_steps,
    default_pag_layers,
    flow_schedule,
    guided_context,
    images_to_latents,
    latents_to_images,
    select_solver,
    step_switched_velocity,
    trigflow_angles,
)
from .schedules import MAX_FLOW_SHIFT, MAX_STEPS, MIN_FLOW_SHIFT, FlowSchedule, img2img_start_step
from .text_encoder import ChiSpec, TextEncoder

ProgressCallback = Callable[[int, int, torch.Tensor], None]
"""(step index from 0, total steps, current x0 prediction [B, C, h, w] float32 latents) -> None."""

# |guidance_scale| and |pag_scale| above this are refused. SANA uses 4.5 (CFG) and 2-3 (PAG),
# ComfyUI's widgets stop at 100; the guided velocity grows with the scale, and at 10^30 it
# overflows to inf and the image comes out black. 1000 leaves room for experiments while the
# latents stay within the DiT's dtype (even fp16) for unit-scale velocities.
MAX_GUIDANCE = 1000.0
# Seeds are what a torch.Generator takes without aliasing: [0, 2^64). torch maps a negative seed
# s to 2^64 + s (so -1 would silently equal 2^64 - 1), hence negatives are refused.
SEED_LIMIT = 2**64
# A ControlNet's conditioning scale: 1 as trained, ComfyUI's Apply ControlNet goes to 10. The
# residuals grow with it; past 100 they swamp the DiT's hidden states whatever the image.
MAX_CONTROL_SCALE = 100.0

Seed = int | Sequence[int]
"""One seed for the whole batch, or one per image (each image then has its own generator)."""


# ---------------------------------------------------------------------------------------
# Stage 1: checks and choices made before any compute (`check_generation_inputs` -> the plan)


def check_components(dit: SanaDiT, dcae: Autoencoder, text_encoder: TextEncoder | None = None) -> None:
    """Raise `SanaCheckpointError` naming both sides when the parts cannot work together:
    the text encoder's hidden size against the DiT's caption channels, and the DC-AE's latent
    channels against the DiT's input and output channels."""
    cfg = dit.config
    if text_encoder is not None and text_encoder.hidden_size != cfg.caption_channels:
        raise SanaCheckpointError(
            f"the text encoder ({text_encoder.folder}) has hidden size {text_encoder.hidden_size}, but the DiT "
            f"({cfg.variant}) expects caption_channels {cfg.caption_channels}; SANA pairs with Gemma-2-2B (2304)"
        )
    for side, channels in (("input", cfg.in_channels), ("output", cfg.out_channels)):
        if dcae.latent_channels != channels:
            raise SanaCheckpointError(
                f"the DC-AE has {dcae.latent_channels} latent channels, but the DiT ({cfg.variant}) has {channels} "
                f"{side} channels; SANA's DiTs pair with a 32-channel DC-AE (f32c32)"
            )


def native_size(dit: SanaDiT, dcae: Autoencoder) -> int:
    """The image side in pixels the DiT was trained at: its `sample_size` (latents) times the
    DC-AE's compression, diffusers' default height and width (1024 for the 1024px models,
    128 for the shipped shapes-tiny model)."""
    return dit.config.sample_size * dcae.spatial_compression


def generation_size(
    dit: SanaDiT, dcae: Autoencoder, height: int, width: int, *, resolution_binning: bool
) -> tuple[int, int]:
    """(height, width) in pixels that the DiT samples at: with binning, the nearest trained
    aspect-ratio bin (tables by the DiT's `sample_size`), or for a DiT without a table (such as
    the shipped shapes-tiny model) each side rounded to the nearest multiple of a DiT token;
    without binning, the request itself.

    A DiT token covers the DC-AE's spatial compression times the DiT's patch size in pixels
    (32 for every released pair); without binning the request must be a multiple of it.
    Sides must be whole numbers of pixels in [1, `MAX_IMAGE_SIDE`] (`check_image_size`).
    """
    height, width = check_image_size(height, width)
    multiple = dcae.spatial_compression * dit.config.patch_size
    if resolution_binning:
        bins = BINS_BY_SAMPLE_SIZE.get(dit.config.sample_size)
        if bins is None:
            return nearest_multiple(height, multiple), nearest_multiple(width, multiple)
        height, width = closest_bin(height, width, bins)
    if height % multiple or width % multiple:
        where = "the resolution bin" if resolution_binning else "with resolution binning off, the size"
        raise SanaInputError(
            f"{where} {height}x{width} (height x width) is not a multiple of {multiple} px: the DC-AE compresses by "
            f"{dcae.spatial_compression} and the DiT patch is {dit.config.patch_size}; pick multiples of {multiple} "
            "or turn resolution binning on"
        )
    return height, width


def check_image_memory(dcae: Autoencoder, batch: int, size: tuple[int, int], sample_size: tuple[int, int]) -> None:
    """Refuse, before any compute, `batch` images of `size` (height, width; sampled at
    `sample_size`) whose decoded pixels alone cannot fit in the memory free now.

    Counted: on the DC-AE's device, the decoded images in its dtype plus one float32 copy (the
    tile blend or the [0, 1] mapping makes it; tiling cannot shrink either); on the host, the
    float32 images returned. A lower bound of the real peak: the DiT's activations and the
    DC-AE's own are not counted (the DC-AE tiles those to fit), so a request that passes may
    still run out of memory, but one that fails here never could have worked.
    """
    pixels = batch * 3 * max(size[0] * size[1], sample_size[0] * sample_size[1])
    element = torch.empty((), dtype=dcae.dtype).element_size()
    device, host = torch.device(dcae.device), torch.device("cpu")
    host_bytes = batch * 3 * size[0] * size[1] * 4
    needs = {device: pixels * (element + 4)}
    needs[host] = needs.get(host, 0) + host_bytes
    for where, need in needs.items():
        _require_free_memory(
            need, where, f"{batch} image(s) of {size[0]}x{size[1]} px (height x width)", "for the decoded pixels alone",
            "ask for fewer or smaller images",
        )


def _require_free_memory(need: int, device: torch.device, what: str, why: str, advice: str) -> None:
    free = default_memory_budget(torch.device(device))
    if need > free:
        raise SanaInputError(
            f"{what} need at least {need / 2**30:.1f} GiB on {device} {why}, but about {free / 2**30:.1f} GiB is "
            f"free; {advice}"
        )


@dataclass(frozen=True)
class GenerationPlan:
    """What `check_generation_inputs` settled before any compute; the later stages read it."""

    prompts: list[str]
    solver: str
    height: int  # the size returned
    width: int
    sample_height: int  # the size the DiT samples at (the bin, or the request without binning)
    sample_width: int
    latent_shape: tuple[int, int, int, int]  # [B, C, h, w] of the noise
    start_step: int  # leading steps img2img skips (0 for text to image)
    pag_layers: tuple[int, ...]
    flow_shift: float  # the request's, else the DiT config's `flow_shift` (unused by TrigFlow)
    branches: tuple[str, ...]  # guidance branches of each model call (`guidance_branches`); () for TrigFlow
    strength: float  # the img2img denoising strength; 1.0 for text to image
    control_steps: range = range(0)  # the sampling steps (from 0, of those run) the ControlNet acts on


def check_sampling_values(
    *,
    steps: int = 20,
    guidance_scale: float = 4.5,
    pag_scale: float = 0.0,
    flow_shift: float | None = None,
    seed: Seed | None = None,
    strength: float = 1.0,
    batch_size: int = 1,
    height: int | None = None,
    width: int | None = None,
    control_scale: float = 1.0,
    control_start: float = 0.0,
    control_end: float = 1.0,
    names: Mapping[str, str] | None = None,
) -> None:
    """The checks of `generate`'s numbers that need no model (bounds in `generate`'s docstring):
    `SanaInputError` naming the argument, its value and the accepted range. `names` renames
    arguments in the messages, e.g. {"guidance_scale": "--cfg"} for a command line, so callers
    can check their own options this way before loading anything."""
    names = names or {}

    def name(argument: str) -> str:
        return names.get(argument, argument)

    check_integer(name("batch_size"), batch_size, low=1)
    check_integer(name("steps"), steps, low=1, high=MAX_STEPS)
    check_number(name("guidance_scale"), guidance_scale, low=-MAX_GUIDANCE, high=MAX_GUIDANCE)
    check_number(name("pag_scale"), pag_scale, low=-MAX_GUIDANCE, high=MAX_GUIDANCE)
    if flow_shift is not None:
        check_number(name("flow_shift"), flow_shift, low=MIN_FLOW_SHIFT, high=MAX_FLOW_SHIFT)
    if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        if not seed:
            raise SanaInputError(f"{name('seed')} is an empty list; give one seed per image, or one for all")
        for i, one in enumerate(seed):
            check_integer(f"{name('seed')}[{i}]", one, low=0, high=SEED_LIMIT - 1)
    elif seed is not None:
        check_integer(name("seed"), seed, low=0, high=SEED_LIMIT - 1)
    check_number(name("strength"), strength, low=0.0, high=1.0)
    for side, value in (("height", height), ("width", width)):
        if value is not None:
            check_integer(name(side), value, low=1, high=MAX_IMAGE_SIDE)
    check_number(name("control_scale"), control_scale, low=0.0, high=MAX_CONTROL_SCALE)
    check_number(name("control_start"), control_start, low=0.0, high=1.0)
    check_number(name("control_end"), control_end, low=0.0, high=1.0)
    if control_start >= control_end:
        raise SanaInputError(
            f"{name('control_start')} {control_start} must be below {name('control_end')} {control_end}: the ControlNet "
            "acts on the steps between them"
        )


def _check_pag_layers(dit: SanaDiT, pag_layers: Sequence[int] | None, pag: bool) -> tuple[int, ...]:
    if pag_layers is None:
        return default_pag_layers(dit)
    if isinstance(pag_layers, (str, bytes)) or not isinstance(pag_layers, Sequence):
        raise SanaInputError(f"pag_layers must be a list of DiT block indices, got {pag_layers!r}")
    layers = tuple(check_integer("pag_layers entry", i, low=0) for i in pag_layers)
    if pag and not layers:
        raise SanaInputError("pag_layers is empty: PAG (pag_scale > 0) needs at least one DiT block to perturb")
    return layers


def _check_latents(latents: object, shape: tuple[int, ...]) -> None:
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise SanaInputError(f"latents must be a float tensor {list(shape)}, got {latents!r:.80}")
    if tuple(latents.shape) != shape:
        raise SanaInputError(
            f"latents have shape {list(latents.shape)}, but this request needs {list(shape)} "
            "(batch, DiT channels, height / compression, width / compression)"
        )
    if not bool(torch.isfinite(latents).all()):
        raise SanaInputError("latents hold NaN or infinite values; the initial noise must be finite")


def _check_image(image: object, batch: int, name: str = "image") -> None:
    shape = list(image.shape) if isinstance(image, torch.Tensor) else None
    if shape is None or len(shape) not in (3, 4) or shape[-1] != 3 or 0 in shape:
        raise SanaInputError(f"{name} must be [B, H, W, 3] in [0, 1] (ComfyUI IMAGE), got {shape or type(image).__name__}")
    if len(shape) == 4 and shape[0] not in (1, batch):
        raise SanaInputError(f"got {shape[0]} {name}s for a batch of {batch}; pass 1 or {batch}")
    low, high = (float(v) for v in torch.stack(list(torch.aminmax(image.detach().float()))).tolist())
    if not (0.0 <= low and high <= 1.0):  # NaN fails both, and min/max propagate it
        raise SanaInputError(f"{name} values must be finite and in [0, 1] (ComfyUI IMAGE); found [{low}, {high}]")


def _check_controlnet(
    dit: SanaDiT, controlnet: SanaControlNet | None, control_image: torch.Tensor | None, solver: str
) -> None:
    if (controlnet is None) != (control_image is None):
        given, missing = ("controlnet", "control_image") if control_image is None else ("control_image", "controlnet")
        raise SanaInputError(f"{given} needs {missing}: a ControlNet is steered by a control image")
    if controlnet is None:
        return
    if not isinstance(controlnet, SanaControlNet):
        raise SanaInputError(f"controlnet must be a SanaControlNet (sana.load_controlnet), got {type(controlnet).__name__}")
    if solver == TRIGFLOW:
        raise SanaInputError("a ControlNet needs a flow solver; SANA-Sprint's TrigFlow sampler takes none")
    check_controlnet_fits(controlnet, dit)
    if controlnet.device != dit.device:
        raise SanaInputError(f"the ControlNet is on {controlnet.device} and the DiT on {dit.device}: load both on one device")


def check_generation_inputs(
    *,
    dit: SanaDiT,
    dcae: Autoencoder,
    text_encoder: TextEncoder | None,
    prompt: str | Sequence[str],
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    steps: int = 20,
    guidance_scale: float = 4.5,
    flow_shift: float | None = None,
    solver: str | None = None,
    seed: Seed | None = None,
    latents: torch.Tensor | None = None,
    pag_scale: float = 0.0,
    resolution_binning: bool = True,
    batch_size: int = 1,
    image: torch.Tensor | None = None,
    strength: float = 1.0,
    callback: ProgressCallback | None = None,
    pag_layers: Sequence[int] | None = None,
    controlnet: SanaControlNet | None = None,
    control_image: torch.Tensor | None = None,
    control_scale: float = 1.0,
    control_start: float = 0.0,
    control_end: float = 1.0,
) -> GenerationPlan:
    """Check every argument of `generate` (same names and defaults) and the parts against each
    other, allocating nothing large and running no model; returns the `GenerationPlan`.

    Raises `SanaInputError` naming the argument and the value (the bounds are in `generate`'s
    docstring), `SanaCheckpointError` naming both sides when the parts do not fit.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SanaInputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.200}")
    if not isinstance(negative_prompt, str):
        raise SanaInputError(f"negative_prompt must be a string, got {negative_prompt!r:.200}")
    check_sampling_values(
        steps=steps, guidance_scale=guidance_scale, pag_scale=pag_scale, flow_shift=flow_shift, seed=seed,
        strength=strength, batch_size=batch_size, height=height, width=width, control_scale=control_scale,
        control_start=control_start, control_end=control_end,
    )
    batch = len(prompts) * batch_size
    if isinstance(seed, Sequence) and len(seed) != batch:
        raise SanaInputError(
            f"seed is a list of {len(seed)} seeds for {batch} images ({len(prompts)} prompt(s) x batch_size "
            f"{batch_size}); give one seed per image, or one for all"
        )
    check_components(dit, dcae, text_encoder)
    solver = select_solver(dit, solver)
    if solver == TRIGFLOW and uses_pag(pag_scale):
        raise SanaInputError("PAG (pag_scale > 0) needs a flow solver; SANA-Sprint's TrigFlow sampler has no PAG")
    _check_controlnet(dit, controlnet, control_image, solver)
    start_step = img2img_start_step(steps, strength) if image is not None else 0
    layers = _check_pag_layers(dit, pag_layers, solver != TRIGFLOW and uses_pag(pag_scale))
    if callback is not None and not callable(callback):
        raise SanaInputError(f"callback must be callable or None, got {callback!r:.80}")

    side = native_size(dit, dcae)
    height, width = check_image_size(side if height is None else height, side if width is None else width)
    sample = generation_size(dit, dcae, height, width, resolution_binning=resolution_binning)
    check_image_memory(dcae, batch, (height, width), sample)
    f = dcae.spatial_compression
    shape = (batch, dit.config.in_channels, sample[0] // f, sample[1] // f)
    if solver == TRIGFLOW:  # the sampler draws every step's noise before its loop
        _require_free_memory(
            (steps - start_step) * math.prod(shape) * 4, dit.device, f"{steps} SANA-Sprint steps",
            "for the noise drawn up front", "Sprint is a 1-4 step model: lower steps",
        )
    if latents is not None:
        _check_latents(latents, shape)
    if image is not None:
        _check_image(image, batch)
    if control_image is not None:
        _check_image(control_image, batch, "control_image")
    return GenerationPlan(
        prompts=prompts, solver=solver, height=height, width=width, sample_height=sample[0], sample_width=sample[1],
        latent_shape=shape, start_step=start_step, pag_layers=layers,
        flow_shift=float(dit.config.flow_shift if flow_shift is None else flow_shift),
        branches=() if solver == TRIGFLOW else guidance_branches(guidance_scale, pag_scale),
        strength=strength if image is not None else 1.0,
        control_steps=control_steps(steps - start_step, control_start, control_end) if controlnet is not None else range(0),
    )


# ---------------------------------------------------------------------------------------
# Stage 2: text and image conditioning


@dataclass
class PromptEmbeddings:
    """Encoded prompts on the compute device: `cond` [B, L, D] and its mask, and the negative
    prompt repeated to B rows (None when no guidance branch needs it)."""

    cond: torch.Tensor
    cond_mask: torch.Tensor
    uncond: torch.Tensor | None = None
    uncond_mask: torch.Tensor | None = None


def encode_prompts(
    text_encoder: TextEncoder,
    prompts: Sequence[str],
    *,
    copies: int,
    negative_prompt: str | None,
    chi: ChiSpec,
    device: torch.device,
) -> PromptEmbeddings:
    """Encode each prompt once (with `chi`) and the negative prompt once (never with the
    CHI), and repeat them to `copies` images per prompt, prompt-major as diffusers'
    `num_images_per_prompt` orders the embeddings. Every row keeps its own prompt's mask
    (diffusers tiles the masks prompt-minor instead, which mismatches them when there are
    several prompts and several copies).

    The encoder runs on `device` (moved there if needed), because encoding 300+ tokens with
    Gemma-2-2B is far faster on the accelerator; when `device` is not the CPU it is moved to
    the CPU afterwards, so the DiT and the decode get that memory. NaN/inf embeddings raise
    `SanaNonFiniteError` naming the text encoder (they would poison every step after).
    """
    model = text_encoder.model
    if text_encoder.device != device:
        model.to(device)
    try:
        cond, cond_mask = text_encoder.encode(list(prompts), chi=chi)
        uncond = uncond_mask = None
        if negative_prompt is not None:
            uncond, uncond_mask = text_encoder.encode([negative_prompt], chi=False)
    finally:
        if device.type != "cpu":
            model.to("cpu")
    rows = len(prompts) * copies
    embeddings = PromptEmbeddings(
        cond=cond.repeat_interleave(copies, dim=0).to(device),
        cond_mask=cond_mask.repeat_interleave(copies, dim=0).to(device),
    )
    if uncond is not None:
        embeddings.uncond = uncond.expand(rows, -1, -1).to(device)
        embeddings.uncond_mask = uncond_mask.expand(rows, -1).to(device)
    for encoded in (embeddings.cond, embeddings.uncond):
        if encoded is not None:
            require_finite(
                encoded,
                f"text encoding (the text encoder {text_encoder.folder})",
                "check its weights, and run it in bfloat16 or float32 (Gemma-2 overflows in float16)",
            )
    return embeddings


def image_latents(dcae: Autoencoder, image: torch.Tensor, plan: GenerationPlan, device: torch.device) -> torch.Tensor:
    """The img2img image (or the ControlNet's control image) as DiT-space latents at the plan's
    sampling size, one row per image of the batch, on `device` (`images_to_latents`)."""
    clean = images_to_latents(dcae, image, plan.sample_height, plan.sample_width).to(device)
    return clean.expand(plan.latent_shape[0], -1, -1, -1)


# ---------------------------------------------------------------------------------------
# Stage 3: the initial latents


def seeded_generator(seed: Seed | None) -> torch.Generator | list[torch.Generator]:
    """The CPU generator every random draw of a generation comes from (the initial noise, then
    Sprint's per-step noise): seeded with `seed`, or randomly for None. A list of seeds gives
    one generator per image, each drawing that image's rows (`draw_noise` with a list)."""
    if isinstance(seed, Sequence):
        return [seeded_generator(int(one)) for one in seed]
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def initial_noise(
    plan: GenerationPlan, generator: torch.Generator | list[torch.Generator], latents: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Standard normal noise of the plan's latent shape, float32 on `device`: the caller's
    `latents`, else drawn from `generator` as diffusers draws it with a CPU generator."""
    if latents is None:
        return draw_noise(plan.latent_shape, generator, device)
    return latents.to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Stage 4: denoising (flow solvers or TrigFlow)


def _progress(callback: ProgressCallback | None, total: int):
    if callback is None:
        return None
    return lambda step, latents, x0: callback(step, total, x0)


def compiled_step(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device | str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`velocity(x, t)` (one sampling step's model evaluation) as a single `torch.compile` graph.

    `fullgraph=True` turns any graph break into an error instead of a silent slowdown; on CUDA,
    "reduce-overhead" replays the step as a CUDA graph. Inside the graph the fused operations
    take their PyTorch references (see `sana.ops.fused`), which the compiler fuses itself.
    """
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    return torch.compile(velocity, fullgraph=True, dynamic=False, mode=mode)


def _caption(context: torch.Tensor, mask: torch.Tensor, compile_model: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Eager: drop the padded columns once, before the loop. Compiled: keep the fixed padded
    # length, so one graph serves every prompt of a size and batch.
    return (context, mask) if compile_model else trim_padded_context(context, mask)


_DENOISING_HINT = "check the DiT's (and any LoRA's or ControlNet's) weights and dtype, and the guidance scale"


@dataclass(frozen=True)
class Control:
    """What `denoise_flow` needs to steer the DiT with a ControlNet: the control image's latents
    `[B or 1, C, h, w]` (DiT space, on the device: `image_latents`), the conditioning scale, and
    the sampling steps it acts on (`GenerationPlan.control_steps`)."""

    controlnet: SanaControlNet
    latents: torch.Tensor
    scale: float = 1.0
    steps: range = range(0)


def guided_pag(dit: SanaDiT, plan: GenerationPlan) -> AbstractContextManager:
    """Identity self-attention in the plan's PAG layers for the perturbed rows of each model
    call while the block is entered (a no-op without PAG); entered before any compute, so bad
    layers fail first."""
    if PERTURBED not in plan.branches:
        return nullcontext()
    batch, chunk = plan.latent_shape[0], plan.branches.index(PERTURBED)
    return perturbed_self_attention(dit, plan.pag_layers, slice(chunk * batch, (chunk + 1) * batch))


def denoise_flow(
    dit: SanaDiT,
    text: PromptEmbeddings,
    noise: torch.Tensor,
    schedule: FlowSchedule,
    *,
    solver: str,
    branches: Sequence[str],
    guidance_scale: float,
    pag_scale: float = 0.0,
    image_latents: torch.Tensor | None = None,
    callback: ProgressCallback | None = None,
    compile_model: bool = False,
    control: Control | None = None,
) -> torch.Tensor:
    """Flow-DPM-Solver or Flow-Euler over `schedule` from `noise` (img2img: `image_latents`
    noised to the schedule's first sigma) with CFG / PAG as `branches` say; returns the final
    DiT-space latents, checked finite (`SanaNonFiniteError` names the first bad step). PAG needs
    `guided_pag` entered around the call. The DiT gets the timestep times `timestep_scale`.

    `control`: at its steps, the ControlNet sees each model call's batch (every guidance branch,
    the control latents repeated per branch as diffusers does) with the DiT's timestep and
    caption, and its residuals go into the DiT's blocks."""
    if image_latents is None:
        start = noise
    else:
        start = add_flow_noise(image_latents, noise, schedule.sigmas[0])
    dtype, timestep_scale = dit.dtype, dit.config.timestep_scale
    context, mask = guided_context(branches, text.cond, text.cond_mask, text.uncond, text.uncond_mask)
    context, mask = _caption(context.to(dtype), mask, compile_model)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return dit(x.to(dtype), t * timestep_scale, context, mask, trim_context=False)

    velocity = guided_velocity(model, guidance_scale=guidance_scale, pag_scale=pag_scale)
    if compile_model:
        velocity = compiled_step(velocity, dit.device)
    if control is not None and control.steps:
        controlled = _controlled_velocity(dit, control, context, mask, len(branches), guidance_scale, pag_scale)
        if compile_model:
            controlled = compiled_step(controlled, dit.device)
        every_step = control.steps == range(schedule.num_steps)
        velocity = controlled if every_step else step_switched_velocity(controlled, velocity, control.steps)
    sampler = flow_dpm_solver if solver == FLOW_DPM_SOLVER else flow_euler
    watch = NonFiniteWatch(_progress(callback, schedule.num_steps))
    return watch.check(sampler(velocity, start, schedule, callback=watch), "denoising", _DENOISING_HINT)


def _controlled_velocity(
    dit: SanaDiT, control: Control, context: torch.Tensor, mask: torch.Tensor, copies: int, guidance_scale: float,
    pag_scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guided velocity of the DiT steered by `control` (see `denoise_flow`)."""
    dtype, timestep_scale = dit.dtype, dit.config.timestep_scale
    latents = control.latents
    if copies > 1 and latents.shape[0] > 1:  # one control row serves the whole call by broadcasting
        latents = torch.cat([latents] * copies)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t * timestep_scale
        residuals = control.controlnet(x, t, context, latents, mask, scale=control.scale, trim_context=False)
        return dit(x.to(dtype), t, context, mask, trim_context=False, block_residuals=residuals)

    guided = guided_velocity(model, guidance_scale=guidance_scale, pag_scale=pag_scale)

    # Its own code object: torch.compile caches graphs per code object, so the plain and the
    # controlled step (both `guided_velocity`'s function otherwise) each keep one graph.
    def controlled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided(x, t)

    return controlled


def denoise_trigflow(
    dit: SanaDiT,
    text: PromptEmbeddings,
    noise: torch.Tensor,
    angles: torch.Tensor,
    generator: torch.Generator | list[torch.Generator],
    *,
    guidance_scale: float,
    image_latents: torch.Tensor | None = None,
    callback: ProgressCallback | None = None,
    compile_model: bool = False,
) -> torch.Tensor:
    """SANA-Sprint's TrigFlow sampler over `angles` from `noise` (img2img: `image_latents` at
    the first angle), `guidance_scale` as the embedded guidance (one pass per step) and fresh
    noise from `generator` every step; returns the final DiT-space latents, checked finite."""
    if image_latents is None:
        start = trigflow_start_latents(noise)
    else:
        start = trigflow_start_latents(noise, image_latents=image_latents, first_angle=angles[0])
    dtype, batch = dit.dtype, noise.shape[0]
    # The scale takes the prompt dtype before the DiT multiplies it by 0.1, as diffusers does
    # (in bf16 that gives 0.44921875 for 4.5, which is what Sprint was tested with).
    guidance = torch.full((batch,), float(guidance_scale)).to(device=dit.device, dtype=text.cond.dtype)
    context, mask = _caption(text.cond.to(dtype), text.cond_mask, compile_model)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return dit(x.to(dtype), t, context, mask, guidance, trim_context=False)

    if compile_model:
        velocity = compiled_step(velocity, dit.device)
    watch = NonFiniteWatch(_progress(callback, len(angles) - 1))
    final = trigflow_sampler(velocity, start, angles, generator=generator, callback=watch)
    return watch.check(final, "denoising", _DENOISING_HINT)


# ---------------------------------------------------------------------------------------
# generate: the stages in order


# no_grad, not inference_mode: the returned images must stay ordinary tensors that callers
# (ComfyUI nodes) may modify in place.
@torch.no_grad()
def generate(
    *,
    dit: SanaDiT,
    dcae: Autoencoder,
    text_encoder: TextEncoder,
    prompt: str | Sequence[str],
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    steps: int = 20,
    guidance_scale: float = 4.5,
    flow_shift: float | None = None,
    solver: str | None = None,
    seed: Seed | None = None,
    latents: torch.Tensor | None = None,
    chi: ChiSpec = True,
    pag_scale: float = 0.0,
    resolution_binning: bool = True,
    batch_size: int = 1,
    image: torch.Tensor | None = None,
    strength: float = 1.0,
    callback: ProgressCallback | None = None,
    pag_layers: Sequence[int] | None = None,
    compile_model: bool = False,
    controlnet: SanaControlNet | None = None,
    control_image: torch.Tensor | None = None,
    control_scale: float = 1.0,
    control_start: float = 0.0,
    control_end: float = 1.0,
) -> torch.Tensor:
    """Generate images with a SANA DiT; returns float32 [B, height, width, 3] in [0, 1] (CPU).

    - `prompt`: a string or a list; B = len(prompts) * `batch_size`, images of one prompt adjacent.
    - `height`, `width`: pixels, each in [1, 16384] (`MAX_IMAGE_SIDE`); None (the default) is the
      DiT's native size, `sample_size` times the DC-AE's compression (1024 for the 1024px
      models, as diffusers' default). The decoded images must fit in the memory free now
      (`check_image_memory`).
    - `solver`: "flow_dpm_solver", "flow_euler" or "trigflow"; None picks "trigflow" for a
      SANA-Sprint DiT (`config.guidance_embeds`) and "flow_dpm_solver" otherwise.
    - `steps`: 1 to 10000 (`MAX_STEPS`).
    - Flow solvers: classifier-free guidance for `guidance_scale` > 1 against `negative_prompt`
      (encoded without the CHI), perturbed-attention guidance for `pag_scale` > 0 in blocks
      `pag_layers` (default `default_pag_layers(dit)`); `flow_shift` None takes the DiT
      config's `flow_shift` (the variant's trained shift: 3, or 6 for 4K), else a number in
      [0.01, 100]. The DiT gets the timestep times `config.timestep_scale`.
    - `guidance_scale` and `pag_scale`: finite, |scale| <= 1000 (`MAX_GUIDANCE`); a scale
      <= 1 (CFG) or <= 0 (PAG) turns that guidance off.
    - TrigFlow (Sprint): `guidance_scale` is the embedded guidance (one pass per step, no
      negative prompt, no PAG); fresh noise is drawn from the seeded generator every step.
    - `seed`: an integer in [0, 2^64) seeding a CPU generator (None: a random seed); negative
      seeds are refused (torch would alias them onto large ones). A list of B such integers
      seeds one generator per image (diffusers' list of generators): image i is then, up to the
      rounding that another batch shape brings, the image `seed[i]` gives its prompt alone. `latents`: the initial
      standard normal noise [B, C, h, w] float32, finite (diffusers' `latents` argument)
      instead of drawing it.
    - `chi`: True for the default complex human instruction, False for none, or custom text.
    - `resolution_binning`: sample at the nearest trained aspect-ratio bin (a DiT without bin
      tables: the nearest multiple of 32), then resize and centre-crop to `height` x `width`;
      off, the size must be a multiple of 32 (the DC-AE's compression times the DiT patch).
    - `image` ([B or 1, H, W, 3], finite, in [0, 1]) with `strength` in (0, 1]: image-to-image.
      The schedule keeps its last round(steps * strength) steps (diffusers' rule) and starts
      from the encoded image noised to the first kept sigma (angle, for TrigFlow).
    - `controlnet` (`sana.load_controlnet`) with `control_image` ([B or 1, H, W, 3], finite, in
      [0, 1], e.g. an edge map): the image goes through the DC-AE at the sampling size (resized
      like `image`) and the ControlNet steers the DiT with it, its residuals times
      `control_scale` (in [0, 100]; 1 as trained) at the sampling steps i with
      i / n >= `control_start` and (i + 1) / n <= `control_end` (fractions in [0, 1], start
      below end, n the steps run: diffusers' `control_guidance_start` / `_end`). Flow solvers
      only; as diffusers' `SanaControlNetPipeline`, and with PAG and img2img too.
    - `callback(step, total, x0)`: after each step, with the current x0 prediction (latents).
    - `compile_model`: run each step's model evaluation through `compiled_step` (the first
      call compiles; worth it for many steps or several generations at one size).

    Every argument is checked before any compute (`check_generation_inputs`): raises
    `SanaCheckpointError` naming both sides when the parts do not fit, and `SanaInputError`
    naming the argument and value when a value cannot be used. Raises `SanaNonFiniteError`
    naming the stage (text encoding, image encoding, the denoising step, decoding) that
    produced NaN or infinity, instead of returning a black image.
    """
    plan = check_generation_inputs(
        dit=dit, dcae=dcae, text_encoder=text_encoder, prompt=prompt, negative_prompt=negative_prompt, height=height,
        width=width, steps=steps, guidance_scale=guidance_scale, flow_shift=flow_shift, solver=solver, seed=seed,
        latents=latents, pag_scale=pag_scale, resolution_binning=resolution_binning, batch_size=batch_size,
        image=image, strength=strength, callback=callback, pag_layers=pag_layers, controlnet=controlnet,
        control_image=control_image, control_scale=control_scale, control_start=control_start, control_end=control_end,
    )
    device = dit.device
    with guided_pag(dit, plan):
        negative = negative_prompt if UNCOND in plan.branches else None
        text = encode_prompts(text_encoder, plan.prompts, copies=batch_size, negative_prompt=negative, chi=chi, device=device)
        clean = None if image is None else image_latents(dcae, image, plan, device)
        control = None
        if controlnet is not None:
            control = Control(controlnet, image_latents(dcae, control_image, plan, device), control_scale, plan.control_steps)
        generator = seeded_generator(seed)
        noise = initial_noise(plan, generator, latents, device)
        if plan.solver == TRIGFLOW:
            final = denoise_trigflow(
                dit, text, noise, trigflow_angles(steps, plan.strength), generator, guidance_scale=guidance_scale,
                image_latents=clean, callback=callback, compile_model=compile_model,
            )
        else:
            final = denoise_flow(
                dit, text, noise, flow_schedule(plan.solver, steps, plan.flow_shift, plan.strength), solver=plan.solver,
                branches=plan.branches, guidance_scale=guidance_scale, pag_scale=pag_scale, image_latents=clean,
                callback=callback, compile_model=compile_model, control=control,
            )
    return latents_to_images(dcae, final, plan.height, plan.width)


__all__ = [
    "Autoencoder",
    "Control",
    "DIFFUSERS_PAG_LAYERS",
    "FLOW_DPM_SOLVER",
    "FLOW_EULER",
    "GenerationPlan",
    "MAX_CONTROL_SCALE",
    "MAX_GUIDANCE",
    "NVLABS_PAG_LAYERS",
    "ProgressCallback",
    "PromptEmbeddings",
    "SEED_LIMIT",
    "Seed",
    "SOLVERS",
    "TRIGFLOW",
    "check_components",
    "check_generation_inputs",
    "check_image_memory",
    "check_sampling_values",
    "compiled_step",
    "default_pag_layers",
    "denoise_flow",
    "denoise_trigflow",
    "encode_prompts",
    "generate",
    "generation_size",
    "guided_pag",
    "image_latents",
    "images_to_latents",
    "initial_noise",
    "latents_to_images",
    "native_size",
    "seeded_generator",
    "select_solver",
]
