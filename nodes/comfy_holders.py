"""What ComfyUI's model management holds for the Sana parts that are not a MODEL (imported only
inside ComfyUI): Gemma-2 (SANA_GEMMA) and the DC-AE inside the native VAE.

A `ModelPatcher` moves what it manages between the load and offload devices and needs a
writable `device` attribute, which transformers' models and our `DCAE` expose only as read-only
properties: `ManagedModule` gives them one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import comfy.model_patcher

from ..sana.samplers import require_finite
from ..sana.text_encoder import TextEncoder

_DCAE_HINT = "check the DC-AE's weights and dtype"


class ManagedModule(nn.Module):
    """A holder ModelPatcher can manage: `inner` is the module, `device` where it is."""

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        self.inner = module
        self.device = device


class DCAEHolder(ManagedModule):
    """`first_stage_model` for ComfyUI's VAE: forwards encode/decode to the DC-AE (which tiles by itself)."""

    def encode(self, images, **kwargs):
        return require_finite(self.inner.encode(images, **kwargs), "DC-AE encoding", _DCAE_HINT)

    def decode(self, latents, **kwargs):
        # ComfyUI's own VAE Decode nodes come here: NaN pixels would otherwise save as black.
        return require_finite(self.inner.decode(latents, **kwargs), "DC-AE decoding", _DCAE_HINT)


@dataclass
class SanaGemma:
    """SANA_GEMMA: a loaded Gemma-2 with its tokenizer, under a ModelPatcher."""

    text_encoder: TextEncoder
    patcher: comfy.model_patcher.ModelPatcher


__all__ = ["DCAEHolder", "ManagedModule", "SanaGemma"]
