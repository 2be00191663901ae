"""What the loader nodes decide (no ComfyUI): which model files and folders to list, where a chosen
entry is, and the dtype widget (the DC-AE's never fp16)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..sana.checkpoint import SHARD_INDEX_SUFFIX, read_shard_index
from ..sana.dcae import FP16_OVERFLOW, default_dcae_dtype
from ..sana.errors import SanaCheckpointError, SanaInputError

# The dtype widget of every loader node.
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dcae_dtype(choice: str, comfy_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The DC-AE Loader's dtype widget as a dtype. auto: `comfy_dtype`, ComfyUI's pick (its
    --bf16-vae / --fp32-vae flags apply). The DC-AE never runs in fp16 (`FP16_OVERFLOW`): an fp16
    choice, or an fp16 pick (--fp16-vae), loads in `default_dcae_dtype(device)` instead, with a
    warning in the log. Kept as an option so that saved workflows still load."""
    if choice not in DTYPES:
        raise SanaInputError(f"unknown dtype {choice!r}; expected one of {list(DTYPES)}")
    dtype = DTYPES[choice] or comfy_dtype
    if dtype != torch.float16:
        return dtype
    safe = default_dcae_dtype(device)
    logging.warning("DC-AE Loader (Sana): not loading in fp16 (%s); using %s instead", FP16_OVERFLOW, safe)
    return safe


def has_config(folder: Path, *subfolders: str) -> bool:
    """Whether `folder` (or one of its `subfolders`, e.g. a diffusers pipeline's transformer/) holds a config.json."""
    return any((folder / sub / "config.json").is_file() for sub in ("", *subfolders))


def is_gemma_folder(folder: Path) -> bool:
    """A Gemma-2 folder (config.json with model_type gemma2), or a diffusers SANA root with text_encoder/."""
    for candidate in (folder, folder / "text_encoder"):
        config = candidate / "config.json"
        if config.is_file():
            try:
                return json.loads(config.read_text()).get("model_type") == "gemma2"
            except (OSError, ValueError):
                return False
    return False


def list_model_entries(
    roots: Iterable[str | os.PathLike],
    extensions: Iterable[str],
    is_model_folder: Callable[[Path], bool],
    *,
    include_files: bool = True,
    max_depth: int = 4,
) -> list[str]:
    """Sorted names ("/"-separated, relative to their root) of model files with `extensions` and of
    folders that `is_model_folder` accepts. A model folder's own files are not listed separately,
    and sharded safetensors are listed as their `*.safetensors.index.json` rather than shard by shard."""
    suffixes = {e.lower() for e in extensions}
    names: set[str] = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for current, dirs, files in os.walk(root, followlinks=True):
            here = Path(current)
            depth = len(here.relative_to(root).parts)
            if here != root and is_model_folder(here):
                names.add(here.relative_to(root).as_posix())
                dirs[:] = []
                continue
            if depth >= max_depth:
                dirs[:] = []
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if include_files:
                for name in _model_files(here, files, suffixes):
                    names.add((here / name).relative_to(root).as_posix())
    return sorted(names)


def _model_files(folder: Path, files: list[str], suffixes: set[str]) -> list[str]:
    """The files of `folder` a loader lists: those with `suffixes`, a shard index in place of its shards."""
    indexes = [name for name in files if name.lower().endswith(SHARD_INDEX_SUFFIX)] if ".safetensors" in suffixes else []
    shards: set[str] = set()
    for index in indexes:
        try:
            shards.update(read_shard_index(folder / index).values())
        except SanaCheckpointError:
            pass  # listed still: loading it names what is wrong
    return indexes + [name for name in files if Path(name).suffix.lower() in suffixes and name not in shards]


def resolve_model_entry(roots: Iterable[str | os.PathLike], name: str) -> Path:
    """The path of model entry `name` (a file or folder) in the first root that has it.

    Raises `SanaCheckpointError` naming the roots searched when it is nowhere, and
    `SanaInputError` for names that climb out of their root."""
    roots = [Path(r) for r in roots]
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise SanaInputError(f"model name {name!r} must be relative to a model folder")
    for root in roots:
        candidate = root / name
        if candidate.exists():
            return candidate
    searched = ", ".join(str(r) for r in roots) or "(no folders configured)"
    raise SanaCheckpointError(f"{name!r} was not found in {searched}")


__all__ = ["DTYPES", "dcae_dtype", "has_config", "is_gemma_folder", "list_model_entries", "resolve_model_entry"]
