"""SANA ControlNets as native ComfyUI CONTROL_NET objects (imported only inside ComfyUI).

`load_sana_controlnet` returns a `SanaComfyControlNet`: ComfyUI's own `comfy.controlnet.ControlNet`
around a `SanaControlModel`, so ComfyUI's Apply ControlNet nodes take it as they take any
ControlNet: strength, start/end percent, chaining (each Apply node wraps the previous one and the
residuals add up), and the VAE input: the control image is a latent-space hint, resized to the
latent's pixel size, encoded by the connected VAE (the Sana DC-AE) and scaled into the model's
latent space (`SanaLatentFormat`). ComfyUI calls the ControlNet with the noisy latents, the
caption and its mask for every cond batch, our Sana KSampler's as its own samplers'; the residuals
reach the DiT through the MODEL's `control` argument (`comfy_model.SanaDiffusionModel`).

What this subclass adds to ComfyUI's ControlNet: the DiT's own timestep (Flow-DPM-Solver's
integer timestep from transformer_options, float32 as the DiT gets it, where ComfyUI would pass
sigma * 1000 in the ControlNet's dtype), and a check before sampling that the MODEL is a SANA DiT
this ControlNet fits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

import comfy.controlnet
import comfy.model_management as model_management

from ..sana.controlnet import SanaControlNet, check_controlnet_fits
from ..sana.controlnet_io import load_controlnet
from ..sana.errors import SanaInputError
from .comfy_model import SanaDiffusionModel, SanaLatentFormat, auto_dtype, caption_inputs

# The control model's keyword argument that carries the DiT's timestep for this call.
DIT_TIMESTEP_ARG = "sana_dit_timestep"
# The conds ComfyUI hands the control model besides the caption (see SanaBaseModel.extra_conds).
CONTROL_CONDS = ["context_mask", "context_length"]


class SanaControlModel(nn.Module):
    """The `control_model` ComfyUI's ControlNet calls, returning {"output": residuals per DiT block}.

    The ControlNet's modules are registered here directly, so ComfyUI's ModelPatcher sees (and
    moves) its weights under the ControlNet's own names."""

    def __init__(self, controlnet: SanaControlNet):
        super().__init__()
        for name, module in controlnet.named_children():
            self.add_module(name, module)
        self.__dict__["controlnet"] = controlnet  # not registered twice: the modules above are its

    @property
    def dtype(self) -> torch.dtype:
        return self.controlnet.dtype

    def forward(self, x, hint, timesteps, context, context_mask=None, context_length=None, **kwargs):
        batch = x.shape[0]
        timestep = kwargs.get(DIT_TIMESTEP_ARG)
        if timestep is None:  # called outside SanaComfyControlNet.get_control: ComfyUI's sigma * 1000
            timestep = timesteps.float()
        context, context_mask, trim = caption_inputs(context, context_mask, context_length, batch)
        return {"output": self.controlnet(x, timestep, context, hint, context_mask, trim_context=trim)}


class SanaComfyControlNet(comfy.controlnet.ControlNet):
    """ComfyUI's ControlNet for a `SanaControlModel` (see the module docstring)."""

    def __init__(self, control_model: SanaControlModel | None = None, load_device=None, manual_cast_dtype=None):
        super().__init__(control_model, compression_ratio=1, latent_format=SanaLatentFormat(), load_device=load_device,
                         manual_cast_dtype=manual_cast_dtype, extra_conds=list(CONTROL_CONDS))
        self.sana_model: SanaDiffusionModel | None = None

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        diffusion_model = getattr(model, "diffusion_model", None)
        if not isinstance(diffusion_model, SanaDiffusionModel):
            raise SanaInputError("a Sana ControlNet steers a SANA MODEL from 'Sana DiT Loader', not this model")
        if diffusion_model.config.guidance_embeds:
            raise SanaInputError("SANA-Sprint takes no ControlNet: use a SANA or SANA-1.5 DiT with Sana ControlNet Loader")
        check_controlnet_fits(self.control_model.controlnet, diffusion_model.dit)
        self.sana_model = diffusion_model

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        if self.sana_model is not None:
            timesteps = self.model_sampling_current.timestep(t).float()
            self.extra_args[DIT_TIMESTEP_ARG] = self.sana_model.dit_timestep(timesteps, transformer_options, x_noisy.shape[0])
        return super().get_control(x_noisy, t, cond, batched_number, transformer_options)

    def cleanup(self):
        self.sana_model = None
        self.extra_args.pop(DIT_TIMESTEP_ARG, None)
        super().cleanup()

    def copy(self):
        c = SanaComfyControlNet(None, load_device=self.load_device, manual_cast_dtype=self.manual_cast_dtype)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        return c


def load_sana_controlnet(path: Path, dtype: torch.dtype | None) -> SanaComfyControlNet:
    """Load a ControlNet file/folder (`sana.load_controlnet`) as a CONTROL_NET, on the offload device."""
    load_device = model_management.get_torch_device()
    dtype = auto_dtype(dtype, load_device)
    controlnet = load_controlnet(path, dtype=dtype, device=model_management.unet_offload_device())
    logging.info("Sana ControlNet %s: variant %s, %d blocks, dtype %s", path.name, controlnet.config.variant,
                 controlnet.config.depth, dtype)
    return SanaComfyControlNet(SanaControlModel(controlnet), load_device=load_device)


__all__ = ["SanaComfyControlNet", "SanaControlModel", "load_sana_controlnet"]
