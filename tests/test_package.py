"""The extension's shape: importable outside ComfyUI, `sana/` free of ComfyUI imports."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_root_package_imports_outside_comfyui():
    spec = importlib.util.spec_from_file_location("sana_comfy_root", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    assert not hasattr(module, "comfy_entrypoint")  # nothing to register without ComfyUI


def imported_modules(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_comfyui_or_the_nodes():
    for folder in ("sana", "trainer"):
        found = imported_modules(ROOT / folder)
        assert not found & {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes"}, (folder, found)


def test_requirements_never_pin_torch():
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert not any(l.split("=")[0].split(">")[0].split("<")[0].strip() == "torch" for l in lines)


def test_root_init_imports_as_a_bare_module():
    """pytest imports the root __init__.py without a package when the checkout's folder name is not an
    identifier (e.g. a clone named `sana-comfy`); that must not fail."""
    spec = importlib.util.spec_from_file_location("__init__", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, "comfy_entrypoint")
