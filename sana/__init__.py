"""SANA for ComfyUI: the library (never imports ComfyUI).

Public API:
- `SanaDiT`, `SanaDiTConfig`, `DIT_PRESETS`: the Linear DiT for every SANA release.
- `load_dit(path, *, dtype=None, device="cpu", config=None)`, `save_dit(model, path, format=...)`.
- `load_text_encoder(folder, *, dtype=None, device="cpu")`: Gemma-2 with the CHI prompt, `.encode(prompts)`.
- `sana.schedules`, `sana.samplers`, `sana.resolution`: flow schedules, Flow-DPM-Solver / Flow-Euler /
  TrigFlow samplers with CFG and PAG, and the aspect-ratio bins.
- `SanaCheckpointError`: raised for every unusable checkpoint or input file.
"""

from .dit import DIT_PRESETS, SanaDiT, SanaDiTConfig
from .dit_io import load_dit, save_dit
from .errors import SanaCheckpointError
from .text_encoder import TextEncoder, load_text_encoder

__all__ = [
    "DIT_PRESETS",
    "SanaCheckpointError",
    "SanaDiT",
    "SanaDiTConfig",
    "TextEncoder",
    "load_dit",
    "load_text_encoder",
    "save_dit",
]
