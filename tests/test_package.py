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


# ---------------------------------------------------------------------------------------
# Imports point one way


LAYERED_PACKAGES = ("sana", "nodes", "trainer")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the layered packages by dotted name (a package by its own name)."""
    return {_module_name(path): path for package in LAYERED_PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _imported_names(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Dotted names of everything `module` imports anywhere in its file: top level, inside
    functions and under `if TYPE_CHECKING:` (a type-hint import is a dependency too), relative
    imports resolved; `from package import name` names the submodule when there is one."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                names.add(submodule if submodule in modules else source)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules importing it runs. Importing `a.b.c` also runs the packages
    `a` and `a.b`, except those the importer sits in (they are already being imported)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        edges = graph.setdefault(module, set())
        for name in _imported_names(module, path, modules):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in modules and target != module and (target == name or target not in ancestors):
                    edges.add(target)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_import_graph_resolves_relative_and_function_level_imports():
    graph = import_graph()
    assert "sana.errors" in graph["sana.dit"]  # from .errors import ...
    assert "sana.kernels" in graph["sana.dit"]  # from .kernels.constants runs sana/kernels/__init__.py
    assert "sana.pipeline" in graph["sana"]
    assert {"nodes.specs", "sana.errors"} <= graph["nodes.comfy_nodes"]  # from . import specs; from ..sana.errors
    assert "trainer.cache" in graph["trainer.__main__"]  # imported inside a function
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    """sana/, nodes/ and trainer/ import one way: no module reaches itself through its imports,
    lazy (function-level) and type-checking imports included."""
    assert import_circles(import_graph()) == []


# sana/'s layers from the bottom up, as the README's layout lists them: a module may import its
# own layer and those below. A new module must be placed here.
SANA_LAYERS = (
    ("sana.errors",),
    ("sana.checkpoint", "sana.resolution", "sana.png"),
    ("sana.kernels",),
    ("sana.ops",),
    ("sana.dit",),
    ("sana.controlnet",),
    ("sana.dcae_config",),
    ("sana.dcae_tiling",),
    ("sana.dcae",),
    ("sana.text_encoder",),
    ("sana.quant",),
    ("sana.dit_io", "sana.controlnet_io", "sana.dcae_io", "sana.lora"),
    ("sana.schedules",),
    ("sana.samplers",),
    ("sana.sampling",),
    ("sana.pipeline",),
    ("sana.memory_plan", "sana.doctor"),
    ("sana.provenance",),
    ("sana.batch",),
    ("sana.replay",),
    ("sana", "sana.cli", "sana.__main__"),  # the package's face, and the command line over it
)


def _layer(module: str) -> int:
    """The index of the layer holding `module` (a subpackage's modules share its layer)."""
    for index, members in enumerate(SANA_LAYERS):
        if any(module == member or module.startswith(member + ".") and member != "sana" for member in members):
            return index
    raise AssertionError(f"{module} is in no layer of SANA_LAYERS: place it there (and in the README's layout)")


def test_sana_imports_point_down_its_layers():
    """Kernels know no model, the models no sampling and no file format, the sampling vocabulary
    no pipeline: every import of a sana/ module goes to its own layer or a lower one."""
    graph = import_graph()
    upward = [
        f"{module} (layer {_layer(module)}) -> {target} (layer {_layer(target)})"
        for module in sorted(graph) if module.split(".")[0] == "sana"
        for target in sorted(graph[module]) if _layer(target) > _layer(module)
    ]
    assert upward == []
