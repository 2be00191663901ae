"""SANA for ComfyUI: the library (never imports ComfyUI).

Public API:
- `SanaDiT`, `SanaDiTConfig`, `DIT_PRESETS`: the Linear DiT for every SANA release.
- `load_dit(path, *, dtype=None, device="cpu", config=None)`, `save_dit(model, path, format=...)`.
- `SanaCheckpointError`: raised for every unusable checkpoint or input file.
"""

from .dit import DIT_PRESETS, SanaDiT, SanaDiTConfig
from .dit_io import load_dit, save_dit
from .errors import SanaCheckpointError

__all__ = ["DIT_PRESETS", "SanaCheckpointError", "SanaDiT", "SanaDiTConfig", "load_dit", "save_dit"]
