"""ComfyUI adapters: thin V3 nodes over `sana/`. Only this package imports ComfyUI.

Outside ComfyUI (tests, scripts, the trainer) `comfy_api` is absent, and importing this package
must still work, so `comfy_entrypoint` exists only when ComfyUI's API can be imported.
"""

from __future__ import annotations

NODE_CLASSES: list[type] = []  # each node module appends its classes here as they are added

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

if ComfyExtension is not None:

    class SanaExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return list(NODE_CLASSES)

    async def comfy_entrypoint() -> SanaExtension:
        return SanaExtension()
