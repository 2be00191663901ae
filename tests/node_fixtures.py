"""Shared test helpers: the extension imported as a package, tiny random models (DiT weights at a
trained scale included) and files written under the official names the workflows use.

The nodes import the library relatively (`from ..sana import ...`), as ComfyUI loads the
extension as a package; tests therefore load the repository root as the package
`sana_comfy_ext`, so its `nodes` and `sana` subpackages are importable without ComfyUI.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sana_comfy_ext"

# Official release names (what a user downloads; see workflows/README.md).
DIT_1024 = "Sana_1600M_1024px_BF16.pth"
DIT_4K = "Sana_1600M_4Kpx_BF16.pth"
DIT_SPRINT = "Sana_Sprint_1.6B_1024px.pth"
CONTROLNET_HED = "Sana_1600M_1024px_BF16_ControlNet_HED.pth"  # goes in models/controlnet/
DCAE_FOLDER = "dc-ae-f32c32-sana-1.1-diffusers"
# The single file the workflows name instead of that folder: its diffusion_pytorch_model.safetensors
# saved under this name (ComfyUI's frontend downloads single .safetensors files, not folders).
DCAE_FILE = "dc-ae-f32c32-sana-1.1.safetensors"
GEMMA_FOLDER = "gemma-2-2b-it"

GEMMA_HIDDEN = 32


def extension():
    """The repository root imported as a package (idempotent)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def ext_module(name: str):
    """`nodes.specs`, `sana.pipeline`, ... of the extension package."""
    extension()
    return importlib.import_module(f"{PACKAGE}.{name}")


def tiny_dit_config(lib, *, sprint: bool = False, sample_size: int = 32, interpolation_scale: float | None = None,
                    hidden_size: int = 64, depth: int = 2, cross_heads: int = 2, cross_head_dim: int = 32):
    """A small SanaDiTConfig paired with the tiny Gemma (32 channels) and a 32-channel DC-AE."""
    return lib.SanaDiTConfig(
        hidden_size=hidden_size,
        depth=depth,
        cross_attention_heads=cross_heads,
        cross_attention_head_dim=cross_head_dim,
        caption_channels=GEMMA_HIDDEN,
        in_channels=32,
        out_channels=32,
        sample_size=sample_size,
        interpolation_scale=interpolation_scale,
        qk_norm=sprint,
        guidance_embeds=sprint,
        flow_shift=6.0 if sample_size >= 128 else 3.0,
    )


def randomize_at_trained_scale(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter of a SANA DiT (ours or diffusers') random at a trained network's scale:
    norms near 1, a random AdaLN table, fan-in-scaled weights (not the zero or one inits)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "scale_shift_table" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def random_dit(lib, config, seed: int = 0):
    """A SanaDiT with random weights (perturbed so no zero-initialised layer hides a bug)."""
    torch.manual_seed(seed)
    dit = lib.SanaDiT(config).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return dit


def write_controlnet_release(lib, dit, path: Path, seed: int = 3) -> Path:
    """A one-block ControlNet for `dit` (its copied block and projections random, so it steers)
    written as NVlabs releases one: the whole SanaMSControlNet, base DiT keys included, in bf16."""
    dit_io, controlnet_io = ext_module("sana.dit_io"), ext_module("sana.controlnet_io")
    torch.manual_seed(seed)
    dit = copy.deepcopy(dit).float()
    controlnet = lib.SanaControlNet.from_dit(dit, 1)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("input_proj.", "output_projs.")):
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.1 * torch.randn_like(p))
            elif name.startswith("blocks."):
                p.add_(0.02 * torch.randn_like(p))
    state = {"pos_embed": dit_io.official_pos_embed(dit.config, torch.float32), **dit_io.dit_state_dict(dit, "official")}
    state.update(controlnet_io.controlnet_state_dict(controlnet, "official"))
    torch.save({"state_dict": {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}}, path)
    return path


def tiny_dcae_config(dcae_module):
    """A 6-stage (compression 32) SANA-layout DC-AE with 32 latent channels and tiny widths."""
    return dcae_module.DCAEConfig(
        latent_channels=32,
        attention_head_dim=8,
        encoder_widths=(8, 8, 16, 16, 32, 32),
        decoder_widths=(8, 8, 16, 16, 32, 32),
        encoder_depths=(1, 1, 1, 1, 1, 1),
        decoder_depths=(1, 1, 1, 1, 1, 1),
        name="tiny-f32c32",
    )


def random_dcae(dcae_module, seed: int = 0):
    torch.manual_seed(seed)
    model = dcae_module.build_dcae(tiny_dcae_config(dcae_module)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def write_model_folders(root: Path) -> dict[str, Path]:
    """Write tiny random models under the official names into ComfyUI-style folders below `root`:
    diffusion_models/ (the three DiT .pth files), controlnet/ (the HED ControlNet release for the
    1024px DiT), vae/ (the DC-AE diffusers folder, and the same weights as one diffusers-layout
    file) and text_encoders/ (a Gemma-2 causal-LM folder). Official .pth files carry no config, so
    the DiTs use a released width (1152) at depth 1 (2 for the 1024px one, whose ControlNet copies
    one block) for the loaders to detect them. Returns the folders."""
    from tiny_gemma import build_tiny_gemma

    lib = ext_module("sana")
    dcae_module = ext_module("sana.dcae")
    dcae_io = ext_module("sana.dcae_io")
    folders = {name: root / name for name in ("diffusion_models", "controlnet", "vae", "text_encoders")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    released = dict(hidden_size=1152, cross_heads=16, cross_head_dim=72)
    for name, kwargs, seed in (
        (DIT_1024, {"depth": 2}, 0),
        (DIT_4K, {"sample_size": 128, "interpolation_scale": 2.0}, 1),
        (DIT_SPRINT, {"sprint": True}, 2),
    ):
        dit = random_dit(lib, tiny_dit_config(lib, **{"depth": 1, **released, **kwargs}), seed).to(torch.bfloat16)
        lib.save_dit(dit, folders["diffusion_models"] / name, format="official")
        if name == DIT_1024:
            write_controlnet_release(lib, dit, folders["controlnet"] / CONTROLNET_HED)
    dcae = random_dcae(dcae_module)
    dcae_io.save_dcae(dcae, folders["vae"] / DCAE_FOLDER)
    dcae_io.save_dcae(dcae, folders["vae"] / DCAE_FILE, layout="diffusers")
    build_tiny_gemma(folders["text_encoders"] / GEMMA_FOLDER, hidden_size=GEMMA_HIDDEN, causal_lm=True)
    return folders
