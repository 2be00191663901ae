"""`python -m sana generate --replay IMAGE.png`: an image made again from the record it carries.

The record (`sana.provenance`) holds the `generate` request with every default resolved, the row
of its output the image is, and the model files with their hashes and dtypes. `replay` loads the
models from the recorded paths (or the ones given, for files that moved), refuses files whose
hash is not the recorded one (the same name with other weights would silently give another
image), calls `generate(**request)` and writes the row to a new PNG that carries the record too.
An image to image request needs its input image, and a ControlNet request its ControlNet and
control image, each found at the recorded path or given, and checked against its recorded hash.

On the machine and device that made the image the replay is exact; elsewhere (another CPU,
a GPU, another thread count) it is as close as those runs are to each other. Batch mode's
images were made in batches; the replay runs the one item alone, which is the image up to the
rounding another batch shape brings (see `sana.batch`). `replay` reports how far the new
image is from the old one, in 8-bit levels.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .batch import dtype_names, load_parts
from .errors import SanaCheckpointError, SanaInputError
from .pipeline import generate
from .png import read_image, write_png
from .provenance import COMPONENTS, SHORT_HASH, describe_models, file_sha256, png_text, project_version, read_record

# The record's dtype names -> torch dtypes (all a loader produces).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTIONS = {"dit": "--dit", "vae": "--vae", "text_encoder": "--text-encoder"}


def replay_path(image: Path) -> Path:
    """Where a replay goes when no output is given: `IMAGE-replay.png` beside the image."""
    return image.with_name(f"{image.stem}-replay.png")


def _model_paths(record: Mapping[str, Any], given: Mapping[str, str], image: Path) -> dict[str, str]:
    """The recorded model paths, or the given ones; `SanaCheckpointError` for one that is not there."""
    paths = {c: given.get(c) or record["models"][c]["path"] for c in COMPONENTS}
    for component, path in paths.items():
        if os.path.exists(path):
            continue
        if component in given:
            raise SanaCheckpointError(f"{OPTIONS[component]} {path} does not exist")
        raise SanaCheckpointError(f"{image} was made with {path}, which is not there; give the file with {OPTIONS[component]}")
    return paths


def check_model_hashes(record: Mapping[str, Any], models: Mapping[str, Mapping[str, str]], image: Path) -> None:
    """`SanaCheckpointError` for a model whose files are not the ones the image was made with."""
    for component in COMPONENTS:
        recorded = record["models"][component].get("sha256")
        found = models[component]["sha256"]
        if recorded is not None and recorded != found:
            raise SanaCheckpointError(
                f"{models[component]['path']} has SHA-256 {found[:SHORT_HASH]}..., but {image} was made with "
                f"{recorded[:SHORT_HASH]}... ({record['models'][component].get('name')}); give that file with "
                f"{OPTIONS[component]}"
            )


# Record keys of the inputs beside the models -> (what it is, the option that gives it).
INPUTS = {"image": ("the input image", "--image"), "control_image": ("the control image", "--control-image")}


def _input_image(record: Mapping[str, Any], key: str, given: Path | None, image: Path) -> torch.Tensor | None:
    source = record.get(key)
    if source is None:
        return None
    what, option = INPUTS[key]
    path = given or Path(source["path"])
    if not path.is_file():
        raise SanaCheckpointError(f"{image} was made from {what} {path}, which is not there; give it with {option}")
    if file_sha256(path) != source.get("sha256"):
        raise SanaCheckpointError(f"{path} is not {what} {image} was made from (its SHA-256 differs); give that one with {option}")
    return read_image(path)


def _controlnet_path(record: Mapping[str, Any], given: str | None, image: Path) -> str | None:
    """The ControlNet the image was made with (recorded or given), its hash checked; None without one."""
    recorded = record.get("controlnet")
    if recorded is None:
        return None
    path = given or recorded.get("path")
    if not isinstance(path, str) or not os.path.exists(path):
        if given:
            raise SanaCheckpointError(f"--controlnet {path} does not exist")
        raise SanaCheckpointError(f"{image} was made with the ControlNet {path}, which is not there; give the file with --controlnet")
    found = describe_models({"controlnet": path})["controlnet"]["sha256"]
    if recorded.get("sha256") is not None and found != recorded["sha256"]:
        raise SanaCheckpointError(
            f"{path} has SHA-256 {found[:SHORT_HASH]}..., but {image} was made with the ControlNet "
            f"{str(recorded['sha256'])[:SHORT_HASH]}... ({recorded.get('name')}); give that file with --controlnet"
        )
    return path


def _dtypes(record: Mapping[str, Any], given: Mapping[str, torch.dtype]) -> dict[str, torch.dtype]:
    dtypes = {}
    for component in COMPONENTS:
        name = record["models"][component].get("dtype", "float32")
        if component not in given and name not in DTYPES:
            raise SanaCheckpointError(f"unknown {component} dtype {name!r} in the record")
        dtypes[component] = given.get(component, DTYPES.get(name))
    return dtypes


def difference_levels(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(largest difference in 8-bit levels, count of differing values) of two [H, W, 3] images in [0, 1]."""
    levels = ((a.clamp(0, 1) * 255).round() - (b.clamp(0, 1) * 255).round()).abs()
    return int(levels.max()), int((levels > 0).sum())


def replay(
    image: Path,
    *,
    out: Path | None = None,
    paths: Mapping[str, str] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
    device: str = "cpu",
    image_input: Path | None = None,
    callback: Callable | None = None,
    compile_model: bool = False,
    log: Callable[[str], None] | None = None,
    controlnet: str | None = None,
    control_image: Path | None = None,
) -> Path:
    """Generate `image` again from its record and write it to `out` (default `replay_path`);
    returns the path written. Everything is checked (record, output path, model and input
    image hashes) before any model loads."""
    log = log if log is not None else (lambda message: print(message, file=sys.stderr, flush=True))
    record = read_record(image)
    out = out or replay_path(image)
    if out.exists() and os.path.samefile(out, image):
        raise SanaInputError(f"--out {out} is the image being replayed; give another file")
    model_paths = _model_paths(record, paths or {}, image)
    models = describe_models(model_paths)
    check_model_hashes(record, models, image)
    source = _input_image(record, "image", image_input, image)
    control = _input_image(record, "control_image", control_image, image)
    controlnet_path = _controlnet_path(record, controlnet, image)
    if (controlnet_path is None) != (control is None):
        raise SanaCheckpointError(f"{image}: the record names a ControlNet or a control image without the other")
    parts = load_parts({**model_paths, "controlnet": controlnet_path}, _dtypes(record, dtypes or {}), device)
    request = record["request"]
    images = generate(dit=parts.dit, dcae=parts.dcae, text_encoder=parts.text_encoder, image=source,
                      controlnet=parts.controlnet, control_image=control, callback=callback,
                      compile_model=compile_model, **request)
    index = record["image_index"]
    if index >= images.shape[0]:
        raise SanaCheckpointError(f"{image}: the record names image {index}, but its request makes {images.shape[0]}")
    again = {**record, "models": {c: {**m, "dtype": dtype_names(parts)[c]} for c, m in models.items()},
             "version": project_version()}
    if controlnet_path is not None:
        again["controlnet"] = {**record["controlnet"], "path": os.path.abspath(controlnet_path)}
    for key, given in (("image", image_input), ("control_image", control_image)):
        if given is not None and key in record:
            again[key] = {**record[key], "path": os.path.abspath(given)}
    write_png(out, images[index], png_text(again))
    before = read_image(image)[0]
    if before.shape != images[index].shape:
        same = f"size {list(images[index].shape[:2])} instead of {list(before.shape[:2])} (height, width)"
    else:
        largest, count = difference_levels(images[index], before)
        same = "identical pixels" if largest == 0 else f"differs by up to {largest} level(s) in {count} of {before.numel()} values"
    log(f"replayed {image} -> {out}: {same}")
    return out


__all__ = ["check_model_hashes", "difference_levels", "replay", "replay_path"]
