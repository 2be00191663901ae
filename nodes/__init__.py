"""ComfyUI adapters: thin V3 nodes over `sana/`. Only this package imports ComfyUI.

- `specs.py`: every node's id, widgets in order, defaults and tooltips (no ComfyUI, no torch);
- what the nodes compute, one module per concern, none importing ComfyUI (CI runs all of it):
  `loaders.py` (model folders, the dtype widget), `text.py` (CONDITIONING), `latents.py`
  (Empty Sana Latent), `sampling.py` (the samplers in ComfyUI's KSAMPLER convention, the
  transformer_options keys), `vae.py` (DC-AE Decode / Encode with tile progress), `previews.py`
  (latent preview colours), `lora.py` (ComfyUI's LoRA key map);
- `comfy_model.py` (the DiT as a native MODEL), `comfy_vae.py` (the DC-AE as a native VAE),
  `comfy_holders.py` (what ModelPatcher holds for Gemma-2 and the DC-AE) and `comfy_nodes.py`
  (the V3 node classes): the ComfyUI glue, imported only when ComfyUI's API is importable.

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
