"""SANA for ComfyUI: the library (never imports ComfyUI).

Public API:
- `SanaDiT`, `SanaDiTConfig`, `DIT_PRESETS`: the Linear DiT for every SANA release.
- `load_dit(path, *, dtype=None, device="cpu", config=None, ema=False)`, `save_dit(model, path, format=...)`.
- `SanaControlNet`, `load_controlnet(path, *, dtype=None, device="cpu", config=None)`, `save_controlnet`:
  the SANA ControlNet (NVlabs' release and diffusers' `SanaControlNetModel`); `generate(controlnet=...)`.
- `DCAE`, `DCAEConfig`, `load_dcae`, `save_dcae`: the deep-compression autoencoder, both weight layouts, tiling.
- `generate(*, dit, dcae, text_encoder, prompt, ...)`: text (or image) to images, as diffusers' SANA pipelines.
- `load_lora(model, path, scale)`: merge a diffusers/PEFT-layout SANA LoRA into a DiT.
- `load_text_encoder(folder, *, dtype=None, device="cpu")`: Gemma-2 with the CHI prompt, `.encode(prompts)`.
- `sana.schedules`, `sana.samplers`, `sana.resolution`: flow schedules, Flow-DPM-Solver / Flow-Euler /
  TrigFlow samplers with CFG and PAG, and the aspect-ratio bins; `sana.sampling`: what `generate`,
  the ComfyUI nodes and the trainer share (solver names, schedule choice, guided text batch,
  latents <-> images); `sana.pipeline`: the stages of `generate`.
- `quantize_w8a8(model)`, `save_w8a8`, `load_w8a8`: W8A8 int8 DiT (`load_dit` reads the files too).
- `SanaError` and its family: `SanaCheckpointError` (a file cannot be used), `SanaInputError`
  (a value cannot be used; also a `ValueError`), `SanaNonFiniteError` (a stage produced NaN/inf).

The modules form layers, each importing only from those below it (README, "Layout").
"""

from .dit import DIT_PRESETS, SanaDiT, SanaDiTConfig
from .dit_io import load_dit, load_w8a8, save_dit
from .controlnet import SanaControlNet
from .controlnet_io import load_controlnet, save_controlnet
from .dcae import DCAE, DCAEConfig
from .dcae_io import load_dcae, save_dcae
from .errors import SanaCheckpointError, SanaError, SanaInputError, SanaNonFiniteError
from .lora import load_lora
from .pipeline import generate
from .quant import quantize_w8a8, save_w8a8
from .text_encoder import TextEncoder, load_text_encoder

__all__ = [
    "DCAE",
    "DCAEConfig",
    "DIT_PRESETS",
    "SanaCheckpointError",
    "SanaError",
    "SanaInputError",
    "SanaNonFiniteError",
    "SanaDiT",
    "SanaDiTConfig",
    "SanaControlNet",
    "TextEncoder",
    "generate",
    "load_controlnet",
    "load_dcae",
    "load_dit",
    "load_lora",
    "load_text_encoder",
    "load_w8a8",
    "quantize_w8a8",
    "save_controlnet",
    "save_dcae",
    "save_dit",
    "save_w8a8",
]
