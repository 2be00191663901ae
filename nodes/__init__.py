"""ComfyUI adapters: thin V3 nodes over `sana/`. Only this package imports ComfyUI.

- `specs.py`: every node's id, widgets in order, defaults and tooltips (no ComfyUI, no torch);
- `logic.py`: what the nodes compute (no ComfyUI): conditioning, latents, schedules, the
  sampler functions in ComfyUI's KSAMPLER convention, preview-colour fitting, DC-AE with progress;
- `comfy_model.py`, `comfy_vae.py`, `comfy_nodes.py`: the ComfyUI glue (native MODEL and VAE,
  V3 node classes), imported only when ComfyUI's API is importable.

Outside ComfyUI (tests, scripts, the trainer) `comfy_api` is absent, and importing this package
must still work, so `comfy_entrypoint` exists only when ComfyUI's API can be imported.
"""

from __future__ import annotations

NODE_CLASSES: list[type] = []

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

if ComfyExtension is not None:
    from .comfy_nodes import NODE_CLASSES as _SANA_NODE_CLASSES

    NODE_CLASSES.extend(_SANA_NODE_CLASSES)

    class SanaExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return list(NODE_CLASSES)

    async def comfy_entrypoint() -> SanaExtension:
        return SanaExtension()
