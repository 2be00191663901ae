"""What the Sana nodes compute, without ComfyUI: CI runs all of it.

- `encode_conditioning`: CONDITIONING lists `[[embeds, {"attention_mask": mask}]]`;
- `empty_latent`: empty latents on the aspect-ratio bins;
- `sana_schedule` and the sampler functions (`flow_sampler_function`, `sprint_sampler_function`):
  ComfyUI's KSAMPLER calling convention `(model, x, sigmas, extra_args, callback, disable)`
  around the one implementation of each solver in `sana.samplers`;
- `fit_latent_rgb_factors` and the preview-factor registry;
- DC-AE decode/encode with a per-tile step callback; model-folder listings;
- the checks the nodes add to ComfyUI's widget ranges (which let NaN through: every comparison
  with NaN is false): `check_sampler_inputs`, the sizes and memory of `empty_latent`, the
  DC-AE's dtype (`dcae_dtype`: never fp16), and NaN/inf results of the samplers and the DC-AE
  raised as `SanaNonFiniteError` (ComfyUI shows a node's exception) instead of black images.

The ComfyUI glue (`comfy_model.py`, `comfy_vae.py`, `comfy_nodes.py`) only adds devices, memory
management, progress bars and ComfyUI's own types around these functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..sana.checkpoint import SHARD_INDEX_SUFFIX, read_shard_index
from ..sana.dcae import FP16_OVERFLOW, default_dcae_dtype
from ..sana.dcae_tiling import default_memory_budget, plan_tiling, tile_spans
from ..sana.errors import SanaCheckpointError, SanaInputError, SanaNonFiniteError, check_integer
from ..sana.lora import lora_alpha, lora_targets
from ..sana.pipeline import FLOW_DPM_SOLVER, FLOW_EULER, SOLVERS, TRIGFLOW, check_sampling_values
from ..sana.resolution import aspect_ratio_bins, check_image_size, closest_bin
from ..sana.samplers import (
    NonFiniteWatch,
    draw_noise,
    flow_dpm_solver,
    flow_euler,
    flow_time_from_trigflow,
    require_finite,
    trigflow_sampler,
)
from ..sana.schedules import (
    TRIGFLOW_SIGMA_DATA,
    FlowSchedule,
    flow_dpm_schedule,
    flow_euler_schedule,
    img2img_start_step,
    trigflow_schedule,
)
from ..sana.text_encoder import TextEncoder

# transformer_options keys the samplers and the PAG patch set, and the DiT adapter reads.
DIT_TIMESTEP_KEY = "sana_dit_timestep"  # the exact timestep value the DiT gets this call
PAG_LAYERS_KEY = "sana_pag_layers"  # blocks whose self-attention is the identity this call

DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# DiT `sample_size` (latent side at the training resolution) per resolution-bin option.
RESOLUTION_BIN_SAMPLE_SIZES: dict[str, int | None] = {"off": None, "512px": 16, "1024px": 32, "2048px": 64, "4096px": 128}

SANA_LATENT_CHANNELS = 32
SANA_COMPRESSION = 32  # DC-AE f32 times DiT patch 1: pixels per latent
SANA_LATENT_SCALE = 0.41407

ComfyCallback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# Text


def chi_argument(chi: str, custom_chi: str = "") -> bool | str:
    """The `TextEncoder.encode(chi=...)` value for the node's CHI combo: preset -> True, off -> False,
    custom -> the custom text (an empty custom text means no CHI)."""
    if chi == "preset":
        return True
    if chi == "off":
        return False
    if chi == "custom":
        return custom_chi if custom_chi.strip() else False
    raise SanaInputError(f"unknown CHI mode {chi!r}; expected preset, off or custom")


def encode_conditioning(text_encoder: TextEncoder, text: str, *, chi: bool | str, max_tokens: int) -> list:
    """CONDITIONING `[[embeds [1, L, H], {"attention_mask": mask [1, L]}]]` on the CPU.

    Each conditioning keeps its own mask, so when ComfyUI batches cond and uncond together every
    row is masked by its own prompt's length (the ExtraModels nodes used one length for all rows).
    """
    embeds, mask = text_encoder.encode([text], chi=chi, max_length=max_tokens)
    return [[embeds.cpu(), {"attention_mask": mask.cpu()}]]


# ---------------------------------------------------------------------------------------------
# Latents


def snap_to_bins(width: int, height: int, resolution_bins: str) -> tuple[int, int]:
    """(width, height) snapped to the nearest aspect-ratio bin of `resolution_bins`, or unchanged for "off".

    The bin tables are (height, width), so the result keeps a portrait request portrait."""
    if resolution_bins not in RESOLUTION_BIN_SAMPLE_SIZES:
        raise SanaInputError(f"unknown resolution bins {resolution_bins!r}; expected one of {list(RESOLUTION_BIN_SAMPLE_SIZES)}")
    sample_size = RESOLUTION_BIN_SAMPLE_SIZES[resolution_bins]
    if sample_size is None:
        return width, height
    bin_height, bin_width = closest_bin(height, width, aspect_ratio_bins(sample_size))
    return bin_width, bin_height


def empty_latent(
    width: int,
    height: int,
    batch_size: int,
    resolution_bins: str,
    *,
    channels: int = SANA_LATENT_CHANNELS,
    compression: int = SANA_COMPRESSION,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int, int]:
    """(zeros [B, channels, H/compression, W/compression], width, height) after bin snapping.

    Sides must be in [1, `MAX_IMAGE_SIDE`] and the latents must fit in the memory free on
    `device` (`SanaInputError` naming the widget otherwise), checked before allocating."""
    height, width = check_image_size(height, width)
    batch_size = check_integer("batch_size", batch_size, low=1)
    width, height = snap_to_bins(width, height, resolution_bins)
    if width % compression or height % compression:
        raise SanaInputError(f"image size {width}x{height} is not a multiple of {compression} px (one SANA latent)")
    shape = [batch_size, channels, height // compression, width // compression]
    need, free = math.prod(shape) * 4, default_memory_budget(torch.device(device))
    if need > free:
        raise SanaInputError(
            f"batch_size {batch_size} at {width}x{height} px needs {need / 2**30:.1f} GiB of latents on {device}, "
            f"but about {free / 2**30:.1f} GiB is free; lower batch_size or the size"
        )
    return torch.zeros(shape, device=device), width, height


# ---------------------------------------------------------------------------------------------
# Schedules


def sana_schedule(solver: str, steps: int, shift: float, denoise: float = 1.0) -> FlowSchedule:
    """The schedule `sana.generate` would run, as ComfyUI sigmas plus the DiT's timesteps.

    flow_dpm_solver / flow_euler: the diffusers-exact shifted flow sigmas (cut for img2img with
    diffusers' strength rule). trigflow: SANA-Sprint's TrigFlow angles as flow times
    t = sin s / (sin s + cos s), which is what the DiT receives and what ComfyUI's flow noise
    scaling needs (a Sprint step is a flow step from x_t = (1 - t) x0 + t noise).
    """
    if solver not in SOLVERS:
        raise SanaInputError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    start = img2img_start_step(steps, denoise)
    if solver == TRIGFLOW:
        times = flow_time_from_trigflow(trigflow_schedule(steps)[start:])
        return FlowSchedule(sigmas=times, timesteps=times[:-1])
    build = flow_dpm_schedule if solver == FLOW_DPM_SOLVER else flow_euler_schedule
    schedule = build(steps, shift)
    return schedule.for_strength(denoise) if start else schedule


# ---------------------------------------------------------------------------------------------
# Samplers in ComfyUI's KSAMPLER convention


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

    The sigmas are flow times t (from `sana_schedule("trigflow", ...)`). In flow terms a TrigFlow
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


# ---------------------------------------------------------------------------------------------
# Latent previews


_PREVIEW_FACTORS: dict[int, tuple[list[list[float]], list[float]]] = {}


def register_preview_factors(latent_channels: int, factors: list[list[float]], bias: list[float]) -> None:
    """Remember latent->RGB preview factors for latents with `latent_channels` channels."""
    _PREVIEW_FACTORS[latent_channels] = (factors, bias)


def preview_factors(latent_channels: int) -> tuple[list[list[float]], list[float]]:
    """The registered preview factors ([C][3] and [3]), or a neutral grey fallback (every channel adds
    equally to R, G and B) until a DC-AE has been loaded."""
    if latent_channels in _PREVIEW_FACTORS:
        return _PREVIEW_FACTORS[latent_channels]
    weight = 0.5 / math.sqrt(latent_channels)
    return [[weight] * 3 for _ in range(latent_channels)], [0.0, 0.0, 0.0]


def preview_fit_images(compression: int, *, fields: int = 16, seed: int = 0) -> torch.Tensor:
    """Synthetic images [N, 3, 4f, 4f] in [0, 1] for the preview fit: the 8 corners of the RGB cube,
    mid grey, and smooth random colour fields (bilinear from 3x3 colours), so the fit sees both flat
    colours and gentle gradients, which is what early denoising steps look like."""
    size = 4 * compression
    corners = torch.tensor([[r, g, b] for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)] + [[0.5, 0.5, 0.5]])
    solid = corners[:, :, None, None].expand(-1, -1, size, size)
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(fields, 3, 3, 3, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    return torch.cat([solid, smooth]).contiguous()


@torch.no_grad()
def fit_latent_rgb_factors(dcae, images: torch.Tensor | None = None) -> tuple[list[list[float]], list[float]]:
    """Least-squares latent->RGB factors for ComfyUI's Latent2RGB previewer, fitted on this DC-AE.

    Encodes `images` ([N, 3, H, W] in [0, 1]; default `preview_fit_images`), scales the latents as
    the DiT sees them (times `scaling_factor`), and solves a ridge-regularised linear map
    [latent, 1] -> the mean [-1, 1] colour of each latent pixel's f x f patch. Returns
    (factors [C][3], bias [3]) as plain lists, the form `LatentFormat` stores.
    """
    f = dcae.spatial_compression
    if images is None:
        images = preview_fit_images(f)
    pixels = (images * 2 - 1).to(device=dcae.device, dtype=dcae.dtype)
    latents = dcae.encode(pixels).float().cpu() * dcae.scaling_factor
    targets = F.avg_pool2d(images.float() * 2 - 1, f)
    features = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    colours = targets.permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([features, torch.ones(features.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = design.T @ design
    ridge = 1e-4 * gram.diagonal()[:-1].mean().clamp_min(1e-12)
    penalty = torch.diag(torch.cat([torch.full((features.shape[1],), float(ridge)), torch.zeros(1)])).double()
    solution = torch.linalg.solve(gram + penalty, design.T @ colours)
    return solution[:-1].float().tolist(), solution[-1].float().tolist()


def preview_rgb(latents: torch.Tensor, factors: list[list[float]], bias: list[float]) -> torch.Tensor:
    """[B, C, h, w] DiT-space latents -> [B, h, w, 3] preview colours in [-1, 1] space (what Latent2RGB computes)."""
    weight = torch.tensor(factors, dtype=torch.float32).T
    return F.linear(latents.float().movedim(1, -1), weight, torch.tensor(bias, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# DC-AE with progress


def dcae_network_calls(dcae, direction: str, shape: tuple[int, ...], tile_size: int | None, tile_overlap: int | None) -> int:
    """How many encoder/decoder calls `dcae.encode/decode` will make for this input (one per chunk
    and tile): the total for a progress bar."""
    chunk, tile, overlap = plan_tiling(dcae, direction, tuple(shape), tile_size, tile_overlap, None)
    chunks = math.ceil(shape[0] / chunk)
    if tile is None:
        return chunks
    f = dcae.spatial_compression
    h, w = (shape[2], shape[3]) if direction == "decode" else (shape[2] // f, shape[3] // f)
    return chunks * len(tile_spans(h, tile, overlap)) * len(tile_spans(w, tile, overlap))


@contextmanager
def calls_reported(module: torch.nn.Module, on_call: Callable[[], None]) -> Iterator[None]:
    """Call `on_call()` before every forward of `module` (each tile of a tiled decode), for
    progress and interrupts. The hook lives only inside the block."""
    handle = module.register_forward_pre_hook(lambda *_: on_call())
    try:
        yield
    finally:
        handle.remove()


def tile_arguments(tile_size: int, tile_overlap: int) -> tuple[int | None, int | None]:
    """The node's widgets as `DCAE.decode/encode` arguments: tile_size 0 means automatic (None),
    and the overlap is clamped to half the tile (ComfyUI's tiled nodes clamp it similarly)."""
    if tile_size <= 0:
        return None, tile_overlap if tile_overlap > 0 else None
    return tile_size, min(tile_overlap, (tile_size // 2) // 32 * 32)


def _run_dcae(dcae, direction: str, inputs: torch.Tensor, tile_size: int, tile_overlap: int,
              on_step: Callable[[int, int], None] | None) -> torch.Tensor:
    """`dcae.decode` or `dcae.encode` with the node's tile widgets, calling `on_step(done, total)`
    before each network call (chunk or tile) and once at the end."""
    tile, overlap = tile_arguments(tile_size, tile_overlap)
    total = dcae_network_calls(dcae, direction, tuple(inputs.shape), tile, overlap)
    done = [0]

    def step() -> None:
        if on_step is not None:
            on_step(min(done[0], total), total)
        done[0] += 1

    network = dcae.decoder if direction == "decode" else dcae.encoder
    with torch.no_grad(), calls_reported(network, step):
        out = getattr(dcae, direction)(inputs, tile_size=tile, tile_overlap=overlap)
    if on_step is not None:
        on_step(total, total)
    return out


_DCAE_HINT = "check the DC-AE's weights, and load it in bf16 or fp32"


def dcae_dtype(choice: str, comfy_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The DC-AE Loader's dtype widget as a dtype. auto: `comfy_dtype`, ComfyUI's pick (its
    --bf16-vae / --fp32-vae flags apply). The DC-AE never runs in fp16 (`FP16_OVERFLOW`): an fp16
    choice, or an fp16 pick (--fp16-vae), loads in `default_dcae_dtype(device)` instead, with a
    warning in the log. Kept as an option so that saved workflows still load."""
    if choice not in DTYPES:
        raise SanaInputError(f"unknown dtype {choice!r}; expected one of {list(DTYPES)}")
    dtype = DTYPES[choice] or comfy_dtype
    if dtype != torch.float16:
        return dtype
    safe = default_dcae_dtype(device)
    logging.warning("DC-AE Loader (Sana): not loading in fp16 (%s); using %s instead", FP16_OVERFLOW, safe)
    return safe


def decode_latents(dcae, latents: torch.Tensor, tile_size: int = 0, tile_overlap: int = 256,
                   on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """ComfyUI LATENT samples (unscaled DC-AE latents) -> IMAGE [B, H, W, 3] in [0, 1] (float32, CPU).

    `on_step(done, total)` is called before each decoder call (chunk or tile). NaN/inf latents
    or pixels raise `SanaNonFiniteError` (naming which) rather than decode to a black image."""
    if not bool(torch.isfinite(latents).all()):
        raise SanaNonFiniteError("the latents to decode hold NaN/inf values: the node that made them (a sampler) went non-finite")
    latents = latents.to(device=dcae.device, dtype=dcae.dtype)
    images = _run_dcae(dcae, "decode", latents, tile_size, tile_overlap, on_step)
    require_finite(images, "DC-AE decoding", _DCAE_HINT)
    return (images.float() / 2 + 0.5).clamp(0, 1).movedim(1, -1).cpu()


def crop_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crop IMAGE [B, H, W, C] to multiples of `multiple` (as ComfyUI's VAE Encode does)."""
    h, w = images.shape[1], images.shape[2]
    new_h, new_w = h // multiple * multiple, w // multiple * multiple
    if new_h == 0 or new_w == 0:
        raise SanaInputError(f"image {w}x{h} is smaller than one DC-AE latent ({multiple} px)")
    top, left = (h - new_h) // 2, (w - new_w) // 2
    return images[:, top : top + new_h, left : left + new_w]


def encode_images(dcae, images: torch.Tensor, tile_size: int = 0, tile_overlap: int = 256,
                  on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in [0, 1] -> unscaled DC-AE latents (float32, CPU), centre-cropped to the compression."""
    images = crop_to_multiple(images[..., :3], dcae.spatial_compression)
    pixels = (images.movedim(-1, 1).float() * 2 - 1).to(device=dcae.device, dtype=dcae.dtype)
    latents = _run_dcae(dcae, "encode", pixels, tile_size, tile_overlap, on_step)
    return require_finite(latents, "DC-AE encoding", _DCAE_HINT).float().cpu()


# ---------------------------------------------------------------------------------------------
# Model folders


def has_config(folder: Path, *subfolders: str) -> bool:
    """Whether `folder` (or one of its `subfolders`, e.g. a diffusers pipeline's transformer/) holds a config.json."""
    return any((folder / sub / "config.json").is_file() for sub in ("", *subfolders))


def is_gemma_folder(folder: Path) -> bool:
    """A Gemma-2 folder (config.json with model_type gemma2), or a diffusers SANA root with text_encoder/."""
    for candidate in (folder, folder / "text_encoder"):
        config = candidate / "config.json"
        if config.is_file():
            try:
                return json.loads(config.read_text()).get("model_type") == "gemma2"
            except (OSError, ValueError):
                return False
    return False


def list_model_entries(
    roots: Iterable[str | os.PathLike],
    extensions: Iterable[str],
    is_model_folder: Callable[[Path], bool],
    *,
    include_files: bool = True,
    max_depth: int = 4,
) -> list[str]:
    """Sorted names ("/"-separated, relative to their root) of model files with `extensions` and of
    folders that `is_model_folder` accepts. A model folder's own files are not listed separately,
    and sharded safetensors are listed as their `*.safetensors.index.json` rather than shard by shard."""
    suffixes = {e.lower() for e in extensions}
    names: set[str] = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for current, dirs, files in os.walk(root, followlinks=True):
            here = Path(current)
            depth = len(here.relative_to(root).parts)
            if here != root and is_model_folder(here):
                names.add(here.relative_to(root).as_posix())
                dirs[:] = []
                continue
            if depth >= max_depth:
                dirs[:] = []
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if include_files:
                for name in _model_files(here, files, suffixes):
                    names.add((here / name).relative_to(root).as_posix())
    return sorted(names)


def _model_files(folder: Path, files: list[str], suffixes: set[str]) -> list[str]:
    """The files of `folder` a loader lists: those with `suffixes`, a shard index in place of its shards."""
    indexes = [name for name in files if name.lower().endswith(SHARD_INDEX_SUFFIX)] if ".safetensors" in suffixes else []
    shards: set[str] = set()
    for index in indexes:
        try:
            shards.update(read_shard_index(folder / index).values())
        except SanaCheckpointError:
            pass  # listed still: loading it names what is wrong
    return indexes + [name for name in files if Path(name).suffix.lower() in suffixes and name not in shards]


def resolve_model_entry(roots: Iterable[str | os.PathLike], name: str) -> Path:
    """The path of model entry `name` (a file or folder) in the first root that has it.

    Raises `SanaCheckpointError` naming the roots searched when it is nowhere, and
    `SanaInputError` for names that climb out of their root."""
    roots = [Path(r) for r in roots]
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise SanaInputError(f"model name {name!r} must be relative to a model folder")
    for root in roots:
        candidate = root / name
        if candidate.exists():
            return candidate
    searched = ", ".join(str(r) for r in roots) or "(no folders configured)"
    raise SanaCheckpointError(f"{name!r} was not found in {searched}")


__all__ = [
    "DIT_TIMESTEP_KEY",
    "DTYPES",
    "PAG_LAYERS_KEY",
    "check_sampler_inputs",
    "chi_argument",
    "dcae_dtype",
    "decode_latents",
    "empty_latent",
    "encode_conditioning",
    "encode_images",
    "fit_latent_rgb_factors",
    "flow_sampler_function",
    "list_model_entries",
    "pag_denoised",
    "preview_factors",
    "register_preview_factors",
    "resolve_model_entry",
    "sampler_function",
    "sana_schedule",
    "snap_to_bins",
    "sprint_sampler_function",
]


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_patch_keys(dit, weight_prefix: str) -> dict[str, str | tuple[str, tuple[int, int, int]]]:
    """ComfyUI's LoRA key map for a SANA DiT: each diffusers/PEFT module name (with and without the
    `transformer.` prefix) → the model weight it adapts, with (dim 0, first row, rows) inside our
    fused Q|K|V and cross-attention K|V weights, so `comfy.lora.load_lora` patches the right rows."""
    key_map: dict[str, str | tuple[str, tuple[int, int, int]]] = {}
    for module, target in lora_targets(dit).items():
        start, stop = target.rows
        weight = f"{weight_prefix}{target.ours}"
        fused = (start, stop) != (0, dit.get_parameter(target.ours).shape[0])
        for prefix in ("transformer.", ""):
            key_map[prefix + module] = (weight, (0, start, stop - start)) if fused else weight
    return key_map


def lora_alpha_entries(lora_state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """`<module>.alpha` entries carrying the alpha a file's adapter metadata gives each module (ComfyUI
    reads alphas from such keys only), so ComfyUI applies the same update as `sana.load_lora`."""
    entries: dict[str, torch.Tensor] = {}
    for key, tensor in lora_state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_key = key[: -len(".lora_A.weight")]
        if f"{module_key}.alpha" in lora_state:
            continue
        module = module_key[len("transformer.") :] if module_key.startswith("transformer.") else module_key
        entries[f"{module_key}.alpha"] = torch.tensor(float(lora_alpha(module, tensor.shape[0], metadata)))
    return entries
