"""The DC-AE as a native ComfyUI VAE (imported only inside ComfyUI).

`SanaDCAEVAE` is a `comfy.sd.VAE` built without its state-dict sniffing: it sets the attributes
the core VAE methods read, so ComfyUI's VAE Decode / VAE Encode / VAE Decode (Tiled) / VAE Encode
(Tiled) work unchanged. Tiled paths go to the DC-AE's own tiler (one blended pass of full-size
tiles) instead of ComfyUI's three averaged passes.
"""

from __future__ import annotations

import torch

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sd

from ..sana.dcae import DCAE
from ..sana.dcae_tiling import DEFAULT_TILE_SIZE, estimate_peak_bytes
from ..sana.samplers import require_finite
from .comfy_holders import DCAEHolder


def _shape_latents(shape, f: int, direction: str) -> tuple[int, int, int]:
    if direction == "decode":
        return shape[0], shape[2], shape[3]
    return shape[0], shape[2] // f, shape[3] // f


class SanaDCAEVAE(comfy.sd.VAE):
    """A DC-AE (sana.dcae.DCAE) under ComfyUI's VAE interface and memory management."""

    def __init__(self, dcae: DCAE, dtype: torch.dtype):
        # Deliberately no super().__init__: that constructor sniffs a state dict to pick an
        # architecture; every attribute its methods use is set here instead.
        self.device = model_management.vae_device()
        offload_device = model_management.vae_offload_device()
        self.vae_dtype = dtype
        self.dcae = dcae.to(device=offload_device, dtype=dtype).eval()
        self.first_stage_model = DCAEHolder(self.dcae, offload_device).eval()
        self.output_device = model_management.intermediate_device()
        f = dcae.spatial_compression
        self.downscale_ratio = f
        self.upscale_ratio = f
        self.latent_channels = dcae.latent_channels
        self.latent_dim = 2
        self.output_channels = 3
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.disable_offload = False
        self.not_video = False
        self.downscale_index_formula = None
        self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.crop_input = True
        self.memory_used_decode = lambda shape, dtype: self.activation_bytes("decode", shape, dtype)
        self.memory_used_encode = lambda shape, dtype: self.activation_bytes("encode", shape, dtype)
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device, offload_device=offload_device)

    def activation_bytes(self, direction: str, shape, dtype) -> int:
        """Memory ComfyUI should free before a decode/encode: the DC-AE's activation peak for one
        image, capped at one default tile, because the DC-AE tiles by itself when less is free."""
        f = self.dcae.spatial_compression
        _, h, w = _shape_latents(shape, f, direction)
        tile = DEFAULT_TILE_SIZE // f
        return estimate_peak_bytes(self.dcae.config, direction, 1, min(h, tile), min(w, tile), dtype)

    def load(self, shape, direction: str) -> None:
        """Bring the DC-AE onto its device through ComfyUI's memory manager."""
        memory = self.activation_bytes(direction, shape, self.vae_dtype)
        model_management.load_models_gpu([self.patcher], memory_required=memory, force_full_load=self.disable_offload)

    def decode_tiled_(self, samples, tile_x=64, tile_y=64, overlap=16):
        f = self.upscale_ratio
        tile = max(tile_x, tile_y) * f
        overlap_px = min(overlap * f, (tile // 2) // f * f)
        images = self.dcae.decode(samples.to(self.device, self.vae_dtype), tile_size=tile, tile_overlap=overlap_px)
        require_finite(images, "DC-AE decoding (tiled)", "check the DC-AE's weights and dtype")
        return self.process_output(images.to(self.output_device).float())

    def encode_tiled_(self, pixel_samples, tile_x=512, tile_y=512, overlap=64):
        f = self.downscale_ratio
        tile = max(tile_x, tile_y) // f * f
        overlap_px = min(overlap // f * f, (tile // 2) // f * f)
        pixels = self.process_input(pixel_samples).to(self.device, self.vae_dtype)
        latents = self.dcae.encode(pixels, tile_size=tile, tile_overlap=overlap_px)
        require_finite(latents, "DC-AE encoding (tiled)", "check the DC-AE's weights and dtype")
        return latents.to(self.output_device).float()
