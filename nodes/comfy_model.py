"""SANA as native ComfyUI objects: the DiT as a MODEL (flow model under a ModelPatcher) and the
latent format with fitted RGB previews (the holders for Gemma-2 and the DC-AE: `comfy_holders.py`).

Imported only inside ComfyUI (it imports `comfy`). The numerics stay in `sana/`; this module
translates ComfyUI's calling conventions:

- ComfyUI calls `diffusion_model(x, t, context=..., control=..., transformer_options=..., **extra_conds)`
  with t = model_sampling.timestep(sigma) (sigma * 1000 for SANA, the flow time itself for Sprint,
  whose multiplier is 1). Flow-DPM-Solver overrides t with diffusers' integer timestep through
  transformer_options[DIT_TIMESTEP_KEY]; PAG asks for identity self-attention through
  transformer_options[PAG_LAYERS_KEY]. Nothing global is patched.
- The conditioning's "attention_mask" becomes the DiT's `context_mask`, the conditioning's
  "guidance" (ComfyUI's FluxGuidance node writes it) Sprint's embedded guidance.
- The padded caption columns are dropped without reading the mask back from the device every
  step: each cond's kept length is computed once, when ComfyUI prepares the conds, and batched
  conds take the longest (`ContextLength`).
- `control` (what ComfyUI's Apply ControlNet nodes attach, merged over chained ControlNets) carries
  a Sana ControlNet's residuals under "output", one entry per DiT block (`comfy_controlnet.py`):
  they become the DiT's `block_residuals`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.samplers
import comfy.supported_models_base

from ..sana.dit import SanaDiT, kept_context_length, perturbed_self_attention
from ..sana.dit_io import load_dit
from ..sana.errors import SanaInputError
from ..sana.quant import is_w8a8, quantize_w8a8
from ..sana.sampling import default_pag_layers
from .latents import SANA_LATENT_CHANNELS, SANA_LATENT_SCALE
from .previews import preview_factors
from .sampling import DIT_TIMESTEP_KEY, PAG_LAYERS_KEY, pag_denoised

SPRINT_DEFAULT_GUIDANCE = 4.5  # SANA-Sprint's default embedded guidance (diffusers' SanaSprintPipeline)


class SanaLatentFormat(comfy.latent_formats.LatentFormat):
    """SANA's DC-AE f32c32 latent: 32 channels, scale 0.41407. The RGB preview factors are read
    at preview time from the registry that DC-AE Loader (Sana) fills by fitting the loaded DC-AE."""

    latent_channels = SANA_LATENT_CHANNELS
    scale_factor = SANA_LATENT_SCALE

    @property
    def latent_rgb_factors(self):
        return preview_factors(self.latent_channels)[0]

    @property
    def latent_rgb_factors_bias(self):
        return preview_factors(self.latent_channels)[1]


class SanaModelConfig(comfy.supported_models_base.BASE):
    """model_config for a loaded SANA DiT (never matched against state dicts: our loader builds it)."""

    unet_config = {}
    unet_extra_config = {}
    latent_format = SanaLatentFormat
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, dit: SanaDiT):
        self.sampling_settings = sampling_settings(dit)
        super().__init__({"disable_unet_model_creation": True, "image_model": "sana"})


def sampling_settings(dit: SanaDiT) -> dict:
    """Flow shift and timestep multiplier for ComfyUI's ModelSamplingDiscreteFlow.

    SANA: the variant's trained shift (3.0, 6.0 at 4K), timestep = 1000 sigma. Sprint: the DiT takes
    the flow time t in [0, 1] itself, so multiplier 1 (its sigmas come from Sana Sigmas)."""
    if dit.config.guidance_embeds:
        return {"shift": 1.0, "multiplier": 1.0}
    return {"shift": float(dit.config.flow_shift), "multiplier": 1000}


class SanaDiffusionModel(nn.Module):
    """ComfyUI's `diffusion_model` for a SANA DiT.

    The DiT's own modules are registered here directly, so the state-dict keys ComfyUI sees
    (`diffusion_model.blocks.0...`) are the DiT's: LoRA/patch keys written for the DiT apply.
    """

    def __init__(self, dit: SanaDiT):
        super().__init__()
        for name, module in dit.named_children():
            self.add_module(name, module)
        self.__dict__["dit"] = dit  # not registered twice: the modules above are the DiT's
        self.config = dit.config

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    def dit_timestep(self, timesteps: torch.Tensor, transformer_options: dict, batch: int) -> torch.Tensor:
        """The float32 timestep `[batch]` the DiT gets for ComfyUI's `timesteps` (sigma * 1000):
        the sampler's override (Flow-DPM-Solver's integer timestep) when it sets one, times the
        config's `timestep_scale` (not for Sprint, which takes the flow time itself)."""
        override = transformer_options.get(DIT_TIMESTEP_KEY)
        if override is not None:
            timestep = torch.full((batch,), float(override), device=timesteps.device, dtype=torch.float32)
        else:
            timestep = timesteps.float().reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.float()
        if not self.config.guidance_embeds:
            timestep = timestep * self.config.timestep_scale
        return timestep

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, context_mask=None, guidance=None,
                context_length=None, **kwargs):
        dit = self.dit
        batch = x.shape[0]
        timestep = self.dit_timestep(timesteps, transformer_options, batch)
        if dit.config.guidance_embeds and guidance is None:
            guidance = torch.full((batch,), SPRINT_DEFAULT_GUIDANCE, device=x.device)
        if guidance is not None:
            guidance = guidance.reshape(-1)
            guidance = guidance.expand(batch) if guidance.numel() == 1 else guidance
        context, context_mask, trim = caption_inputs(context, context_mask, context_length, batch)
        residuals = control.get("output") if control is not None else None
        layers = transformer_options.get(PAG_LAYERS_KEY)
        if layers:
            with perturbed_self_attention(dit, layers, slice(None)):
                return dit(x, timestep, context, context_mask, guidance, trim_context=trim, block_residuals=residuals)
        return dit(x, timestep, context, context_mask, guidance, trim_context=trim, block_residuals=residuals)


def caption_inputs(
    context: torch.Tensor, context_mask: torch.Tensor | None, context_length: int | None, batch: int
) -> tuple[torch.Tensor, torch.Tensor | None, bool | None]:
    """(context, context_mask, trim_context) for a DiT (or ControlNet) call from ComfyUI's conds:
    the mask broadcast to the batch, and both cut to the kept length computed once per sampling
    (`ContextLength`), so nothing is trimmed per step; without a known length, the model trims."""
    if context_mask is not None and context_mask.shape[0] != batch:
        context_mask = context_mask.expand(batch, -1)
    if context_length is not None and context_mask is not None:
        return context[:, :context_length], context_mask[:, :context_length], False
    return context, context_mask, None


class ContextLength(comfy.conds.CONDConstant):
    """A cond's kept caption length (a Python int); conds batched together keep the longest."""

    def can_concat(self, other) -> bool:
        return True

    def concat(self, others) -> int:
        return max([self.cond, *(other.cond for other in others)])


class SanaBaseModel(comfy.model_base.BaseModel):
    """A SANA DiT as a ComfyUI flow model (ModelType.FLOW: x_sigma = sigma noise + (1 - sigma) x0)."""

    def __init__(self, model_config: SanaModelConfig, dit: SanaDiT, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = SanaDiffusionModel(dit)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            # CONDRegular, not CONDCrossAttn: the latter pads prompts of different lengths by
            # repetition to batch them, which would misalign them with their masks.
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["context_mask"] = comfy.conds.CONDRegular(mask)
            out["context_length"] = ContextLength(kept_context_length(mask.reshape(-1, mask.shape[-1])))
        if self.diffusion_model.config.guidance_embeds:
            guidance = kwargs.get("guidance", SPRINT_DEFAULT_GUIDANCE)
            if guidance is not None:
                out["guidance"] = comfy.conds.CONDRegular(torch.FloatTensor([float(guidance)]))
        return out


def auto_dtype(choice: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype for `choice` (None = auto): bf16 where the device runs it well, else fp32.

    fp16 is never picked automatically: SANA's text encoder and DC-AE overflow in it."""
    if choice is not None:
        return choice
    if model_management.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


def load_sana_model(path: Path, dtype: torch.dtype | None, variant: str | None) -> comfy.model_patcher.ModelPatcher:
    """Load a DiT file/folder as a ModelPatcher-wrapped SanaBaseModel on the offload device."""
    load_device = model_management.get_torch_device()
    offload_device = model_management.unet_offload_device()
    dtype = auto_dtype(dtype, load_device)
    dit = load_dit(path, dtype=dtype, device=offload_device, config=variant)
    model_config = SanaModelConfig(dit)
    model = SanaBaseModel(model_config, dit, device=offload_device)
    logging.info("Sana DiT %s: variant %s, dtype %s, shift %s", path.name, dit.config.variant, dtype, model_config.sampling_settings)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def w8a8_model(model: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """A new MODEL holding a W8A8 copy of `model`'s SANA DiT; `model` itself is left as it is.

    The input is first loaded as for sampling, so the copy is quantized from the weights ComfyUI
    would run (weight patches such as LoRAs merged) on the load device; the result is moved to
    the offload device. Weight patches therefore do not carry over (int8 weights cannot take
    them); object patches (e.g. ModelSamplingSD3's shift) and model options (e.g. PAG) do."""
    if is_w8a8(sana_dit(model)):
        raise SanaInputError("this MODEL is already W8A8-quantized")
    model_management.load_models_gpu([model])
    with torch.no_grad():
        quantized = quantize_w8a8(sana_dit(model)).to(model.offload_device)
    base = SanaBaseModel(SanaModelConfig(quantized), quantized, device=model.offload_device)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=model.load_device, offload_device=model.offload_device)
    patcher.model_options = copy.deepcopy(model.model_options)
    for name, obj in model.object_patches.items():
        patcher.add_object_patch(name, obj)
    logging.info("Sana W8A8: quantized %d layers of %s", len(quantized.w8a8_plan), quantized.config.variant)
    return patcher


def sana_dit(model: comfy.model_patcher.ModelPatcher) -> SanaDiT:
    """The SanaDiT inside a MODEL, or a clear error when the MODEL is not a SANA one."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    if not isinstance(diffusion_model, SanaDiffusionModel):
        raise SanaInputError("this node needs a SANA model from 'Sana DiT Loader'")
    return diffusion_model.dit


def with_pag(model: comfy.model_patcher.ModelPatcher, scale: float, layers=None) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` with perturbed-attention guidance: after CFG, one more conditional pass
    with identity self-attention in `layers` (default: NVlabs' PAG block), added as
    denoised + scale (x0_cond - x0_perturbed)."""
    layers = tuple(layers) if layers is not None else default_pag_layers(sana_dit(model))

    def post_cfg(args):
        options = dict(args["model_options"])
        options["transformer_options"] = {**options.get("transformer_options", {}), PAG_LAYERS_KEY: layers}
        (perturbed,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], options)
        return pag_denoised(args["denoised"], args["cond_denoised"], perturbed, scale)

    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=False)
    return patched
