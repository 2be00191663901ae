"""ComfyUI entry point: ComfyUI imports this folder as a package and calls `comfy_entrypoint`.

Importing it outside ComfyUI works and registers nothing. Tools that import this file as a bare
module (pytest does, when the checkout's folder name is not a Python identifier) get nothing too.
"""

if __package__:
    from .nodes import ComfyExtension as _ComfyExtension

    if _ComfyExtension is not None:
        from .nodes import comfy_entrypoint  # noqa: F401
