"""ComfyUI entry point: ComfyUI imports this folder as a package and calls `comfy_entrypoint`.

Importing it outside ComfyUI works and registers nothing.
"""

from .nodes import ComfyExtension as _ComfyExtension

if _ComfyExtension is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
