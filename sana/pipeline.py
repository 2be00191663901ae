"""Text-to-image and image-to-image with SANA, SANA-1.5 and SANA-Sprint: `generate`.

`generate` wires the loaded parts together (Gemma-2 text encoder, DiT, DC-AE) with the
schedules and samplers of `sana.schedules` / `sana.samplers`; it holds no numerics of its
own beyond the glue. With the same initial noise it reproduces diffusers' `SanaPipeline`
(Flow-DPM-Solver, Flow-Euler), `SanaPAGPipeline` (PAG), `SanaSprintPipeline` and
`SanaSprintImg2ImgPipeline` (TrigFlow), which `tests/test_pipeline.py` checks.

Images go in and come out in ComfyUI's IMAGE convention: float [B, H, W, 3] in [0, 1].

Order of work, and why:
1. check every argument and that the parts fit each other before any compute
   (`check_generation_inputs`: numbers finite and in range, sizes, seeds, latents, images,
   caption and latent channels, a memory estimate of the decoded images), so a bad request
   fails in milliseconds with the argument or both sides named;
2. encode the prompts on the compute device (the DiT's), then move the text encoder off it:
   Gemma-2-2B is not needed again and its memory goes to the DiT and the decode;
3. draw the noise from a CPU generator (so a seed gives the same image on every device, and
   the same as diffusers with `torch.Generator("cpu")`), denoise, decode with the DC-AE, whose
   `decode` tiles by itself when the image would not fit in memory, and resize-and-crop back
   from the resolution bin to the requested size;
4. check each stage's output once (`SanaNonFiniteError` naming the text encoding, the image
   encoding, the denoising step, or the decoding that produced NaN/inf), so a broken weight,
   LoRA or dtype never comes back as a black image.

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
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .dcae_tiling import default_memory_budget
from .dit import SanaDiT, perturbed_self_attention, trim_padded_context
from .errors import SanaCheckpointError, SanaInputError, check_integer, check_number
from .resolution import (
    BINS_BY_SAMPLE_SIZE,
    MAX_IMAGE_SIDE,
    check_image_size,
    closest_bin,
    nearest_multiple,
    resize_and_crop,
)
from .samplers import (
    COND,
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
from .schedules import (
    MAX_FLOW_SHIFT,
    MAX_STEPS,
    MIN_FLOW_SHIFT,
    default_flow_shift,
    flow_dpm_schedule,
    flow_euler_schedule,
    img2img_start_step,
    trigflow_schedule,
)
from .text_encoder import ChiSpec, TextEncoder

FLOW_DPM_SOLVER = "flow_dpm_solver"
FLOW_EULER = "flow_euler"
TRIGFLOW = "trigflow"
SOLVERS = (FLOW_DPM_SOLVER, FLOW_EULER, TRIGFLOW)

ProgressCallback = Callable[[int, int, torch.Tensor], None]
"""(step index from 0, total steps, current x0 prediction [B, C, h, w] float32 latents) -> None."""

# NVlabs' `pag_applied_layers` per released depth (Sana_1600M: 20 blocks, Sana_600M: 28).
# Other depths fall back to diffusers' SanaPAGPipeline default, block 0.
NVLABS_PAG_LAYERS: dict[int, tuple[int, ...]] = {20: (8,), 28: (14,)}
DIFFUSERS_PAG_LAYERS: tuple[int, ...] = (0,)

# |guidance_scale| and |pag_scale| above this are refused. SANA uses 4.5 (CFG) and 2-3 (PAG),
# ComfyUI's widgets stop at 100; the guided velocity grows with the scale, and at 10^30 it
# overflows to inf and the image comes out black. 1000 leaves room for experiments while the
# latents stay within the DiT's dtype (even fp16) for unit-scale velocities.
MAX_GUIDANCE = 1000.0
# Seeds are what a torch.Generator takes without aliasing: [0, 2^64). torch maps a negative seed
# s to 2^64 + s (so -1 would silently equal 2^64 - 1), hence negatives are refused.
SEED_LIMIT = 2**64


class Autoencoder(Protocol):
    """What `generate` needs from a DC-AE: `sana.dcae.DCAE` (`load_dcae`) is one."""

    scaling_factor: float
    spatial_compression: int
    latent_channels: int
    dtype: torch.dtype
    device: torch.device

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...  # [-1, 1] -> unscaled latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...  # unscaled latents -> [-1, 1]


# ---------------------------------------------------------------------------------------
# Checks and choices made before any compute


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
    """What `check_generation_inputs` settled before any compute."""

    prompts: list[str]
    solver: str
    height: int  # the size returned
    width: int
    sample_height: int  # the size the DiT samples at (the bin, or the request without binning)
    sample_width: int
    latent_shape: tuple[int, int, int, int]  # [B, C, h, w] of the noise
    start_step: int  # leading steps img2img skips (0 for text to image)
    pag_layers: tuple[int, ...]


def check_sampling_values(
    *,
    steps: int = 20,
    guidance_scale: float = 4.5,
    pag_scale: float = 0.0,
    flow_shift: float | None = None,
    seed: int | None = None,
    strength: float = 1.0,
    batch_size: int = 1,
    height: int | None = None,
    width: int | None = None,
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
    if seed is not None:
        check_integer(name("seed"), seed, low=0, high=SEED_LIMIT - 1)
    check_number(name("strength"), strength, low=0.0, high=1.0)
    for side, value in (("height", height), ("width", width)):
        if value is not None:
            check_integer(name(side), value, low=1, high=MAX_IMAGE_SIDE)


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


def _check_image(image: object, batch: int) -> None:
    shape = list(image.shape) if isinstance(image, torch.Tensor) else None
    if shape is None or len(shape) not in (3, 4) or shape[-1] != 3 or 0 in shape:
        raise SanaInputError(f"image must be [B, H, W, 3] in [0, 1] (ComfyUI IMAGE), got {shape or type(image).__name__}")
    if len(shape) == 4 and shape[0] not in (1, batch):
        raise SanaInputError(f"got {shape[0]} images for a batch of {batch}; pass 1 or {batch}")
    low, high = (float(v) for v in torch.stack(list(torch.aminmax(image.detach().float()))).tolist())
    if not (0.0 <= low and high <= 1.0):  # NaN fails both, and min/max propagate it
        raise SanaInputError(f"image values must be finite and in [0, 1] (ComfyUI IMAGE); found [{low}, {high}]")


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
    seed: int | None = None,
    latents: torch.Tensor | None = None,
    pag_scale: float = 0.0,
    resolution_binning: bool = True,
    batch_size: int = 1,
    image: torch.Tensor | None = None,
    strength: float = 1.0,
    callback: ProgressCallback | None = None,
    pag_layers: Sequence[int] | None = None,
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
        strength=strength, batch_size=batch_size, height=height, width=width,
    )
    batch = len(prompts) * batch_size
    check_components(dit, dcae, text_encoder)
    solver = select_solver(dit, solver)
    if solver == TRIGFLOW and uses_pag(pag_scale):
        raise SanaInputError("PAG (pag_scale > 0) needs a flow solver; SANA-Sprint's TrigFlow sampler has no PAG")
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
    return GenerationPlan(prompts, solver, height, width, *sample, shape, start_step, layers)


# ---------------------------------------------------------------------------------------
# Pixels <-> latents


_DCAE_HINT = "check the DC-AE's weights, and run it in bfloat16 or float32"


def images_to_latents(dcae: Autoencoder, images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ComfyUI images [B, H, W, 3] in [0, 1] -> DiT-space latents (DC-AE latents times its
    scaling factor), float32, at (height, width) pixels.

    An image of another size is resized with bilinear interpolation (align_corners=False), as
    diffusers' Sprint img2img pipeline does with a tensor input; no crop, so a different aspect
    ratio is stretched. NaN/inf latents raise `SanaNonFiniteError`.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise SanaInputError(f"image must be [B, H, W, 3] in [0, 1] (ComfyUI IMAGE), got shape {list(images.shape)}")
    pixels = images.movedim(-1, 1).float()
    if tuple(pixels.shape[-2:]) != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
    pixels = (pixels * 2 - 1).to(device=dcae.device, dtype=dcae.dtype)
    latents = require_finite(dcae.encode(pixels), "image encoding (DC-AE encode)", _DCAE_HINT)
    return (latents * dcae.scaling_factor).float()


def latents_to_images(dcae: Autoencoder, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DiT-space latents -> ComfyUI images [B, height, width, 3] float32 in [0, 1] (CPU).

    The decode runs in the DC-AE's dtype on its device, and tiles when the image would not fit
    in memory (`DCAE.decode` plans that); NaN/inf pixels raise `SanaNonFiniteError`. A
    bin-sized image is resized to cover the request and centre-cropped (`resize_and_crop`), in
    diffusers' order: cast, unscale, decode, resize, then map [-1, 1] to [0, 1].
    """
    latents = latents.to(device=dcae.device, dtype=dcae.dtype)
    decoded = require_finite(dcae.decode(latents / dcae.scaling_factor), "decoding (DC-AE decode)", _DCAE_HINT)
    decoded = resize_and_crop(decoded, height, width)
    return (decoded / 2 + 0.5).clamp(0, 1).float().movedim(1, -1).cpu()


# ---------------------------------------------------------------------------------------
# Text


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
    the CPU afterwards, so the DiT and the decode get that memory.
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
    return embeddings


# ---------------------------------------------------------------------------------------
# generate


def default_pag_layers(dit: SanaDiT) -> tuple[int, ...]:
    """NVlabs' PAG layers for the released depths (block 8 of 20, block 14 of 28), else
    diffusers' default (block 0)."""
    return NVLABS_PAG_LAYERS.get(dit.config.depth, DIFFUSERS_PAG_LAYERS)


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
    seed: int | None = None,
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
      `pag_layers` (default `default_pag_layers(dit)`); `flow_shift` None takes the DiT's
      trained shift (3, or 6 for 4K), else a number in [0.01, 100]. The DiT gets the timestep
      times `config.timestep_scale`.
    - `guidance_scale` and `pag_scale`: finite, |scale| <= 1000 (`MAX_GUIDANCE`); a scale
      <= 1 (CFG) or <= 0 (PAG) turns that guidance off.
    - TrigFlow (Sprint): `guidance_scale` is the embedded guidance (one pass per step, no
      negative prompt, no PAG); fresh noise is drawn from the seeded generator every step.
    - `seed`: an integer in [0, 2^64) seeding a CPU generator (None: a random seed); negative
      seeds are refused (torch would alias them onto large ones). `latents`: the initial
      standard normal noise [B, C, h, w] float32, finite (diffusers' `latents` argument)
      instead of drawing it.
    - `chi`: True for the default complex human instruction, False for none, or custom text.
    - `resolution_binning`: sample at the nearest trained aspect-ratio bin (a DiT without bin
      tables: the nearest multiple of 32), then resize and centre-crop to `height` x `width`;
      off, the size must be a multiple of 32 (the DC-AE's compression times the DiT patch).
    - `image` ([B or 1, H, W, 3], finite, in [0, 1]) with `strength` in (0, 1]: image-to-image.
      The schedule keeps its last round(steps * strength) steps (diffusers' rule) and starts
      from the encoded image noised to the first kept sigma (angle, for TrigFlow).
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
        image=image, strength=strength, callback=callback, pag_layers=pag_layers,
    )
    solver, shape, start_step = plan.solver, plan.latent_shape, plan.start_step
    sprint = solver == TRIGFLOW
    device = dit.device
    batch = shape[0]
    branches = () if sprint else guidance_branches(guidance_scale, pag_scale)
    pag_context = nullcontext()
    if PERTURBED in branches:
        perturbed = branches.index(PERTURBED)
        pag_context = perturbed_self_attention(dit, plan.pag_layers, slice(perturbed * batch, (perturbed + 1) * batch))

    # Entered first so that bad PAG layers fail before any compute.
    with pag_context:
        text = encode_prompts(
            text_encoder,
            plan.prompts,
            copies=batch_size,
            negative_prompt=negative_prompt if UNCOND in branches else None,
            chi=chi,
            device=device,
        )
        _check_text(text, text_encoder)
        clean = None
        if image is not None:
            clean = images_to_latents(dcae, image, plan.sample_height, plan.sample_width).to(device)
            clean = clean.expand(batch, -1, -1, -1)

        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        if latents is None:
            noise = draw_noise(shape, generator, device)
        else:
            noise = latents.to(device=device, dtype=torch.float32)
        dtype = dit.dtype

        if sprint:
            angles = trigflow_schedule(steps)[start_step:]
            if clean is None:
                start = trigflow_start_latents(noise)
            else:
                start = trigflow_start_latents(noise, image_latents=clean, first_angle=angles[0])
            # The scale takes the prompt dtype before the DiT multiplies it by 0.1, as diffusers
            # does (in bf16 that gives 0.44921875 for 4.5, which is what Sprint was tested with).
            guidance = torch.full((batch,), float(guidance_scale)).to(device=device, dtype=text.cond.dtype)
            context, mask = text.cond.to(dtype), text.cond_mask
            if not compile_model:  # compiled: keep the fixed padded length, one graph for every prompt
                context, mask = trim_padded_context(context, mask)

            def sprint_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return dit(x.to(dtype), t, context, mask, guidance, trim_context=False)

            if compile_model:
                sprint_velocity = compiled_step(sprint_velocity, device)

            watch = NonFiniteWatch(_progress(callback, len(angles) - 1))
            final = trigflow_sampler(sprint_velocity, start, angles, generator=generator, callback=watch)
        else:
            shift = flow_shift if flow_shift is not None else default_flow_shift(dit.config.sample_size)
            schedule = (flow_dpm_schedule if solver == FLOW_DPM_SOLVER else flow_euler_schedule)(steps, shift)
            schedule = schedule.for_strength(strength) if clean is not None else schedule
            start = noise if clean is None else add_flow_noise(clean, noise, schedule.sigmas[0])
            # One context row block per guidance branch; the perturbed branch sees the prompt.
            texts = {UNCOND: (text.uncond, text.uncond_mask), COND: (text.cond, text.cond_mask)}
            texts[PERTURBED] = texts[COND]
            context = torch.cat([texts[b][0] for b in branches]).to(dtype)
            mask = torch.cat([texts[b][1] for b in branches])
            if not compile_model:
                context, mask = trim_padded_context(context, mask)
            timestep_scale = dit.config.timestep_scale

            def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return dit(x.to(dtype), t * timestep_scale, context, mask, trim_context=False)

            velocity = guided_velocity(model, guidance_scale=guidance_scale, pag_scale=pag_scale)
            if compile_model:
                velocity = compiled_step(velocity, device)
            sampler = flow_dpm_solver if solver == FLOW_DPM_SOLVER else flow_euler
            watch = NonFiniteWatch(_progress(callback, schedule.num_steps))
            final = sampler(velocity, start, schedule, callback=watch)
        watch.check(final, "denoising", "check the DiT's (and any LoRA's) weights and dtype, and the guidance scale")

    return latents_to_images(dcae, final, plan.height, plan.width)


def _check_text(text: PromptEmbeddings, text_encoder: TextEncoder) -> None:
    """NaN/inf embeddings would poison every step after: name the text encoder instead."""
    for embeddings in (text.cond, text.uncond):
        if embeddings is not None:
            require_finite(
                embeddings,
                f"text encoding (the text encoder {text_encoder.folder})",
                "check its weights, and run it in bfloat16 or float32 (Gemma-2 overflows in float16)",
            )


__all__ = [
    "Autoencoder",
    "GenerationPlan",
    "MAX_GUIDANCE",
    "SEED_LIMIT",
    "FLOW_DPM_SOLVER",
    "FLOW_EULER",
    "SOLVERS",
    "TRIGFLOW",
    "ProgressCallback",
    "PromptEmbeddings",
    "check_components",
    "check_generation_inputs",
    "check_image_memory",
    "check_sampling_values",
    "compiled_step",
    "default_pag_layers",
    "encode_prompts",
    "generate",
    "generation_size",
    "images_to_latents",
    "latents_to_images",
    "native_size",
    "select_solver",
]
