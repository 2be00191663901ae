"""`python -m trainer pack`: a built model folder copied compactly for shipping (fp16 DiT and
DC-AE weights), as `assets/shapes-tiny` is.

The copy is written next to its destination and renamed into place, so a failure leaves no
half-written folder; an existing destination is replaced only when asked (`overwrite`) and only
when it is a model folder (what an earlier pack wrote), never an unrelated folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sana.errors import SanaCheckpointError, SanaInputError

from .shapes_model import MODEL_PARTS

PACKED_FILES = ("model_index.json", "preset_summary.json")


def check_pack_paths(folder: Path, out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a source that is not a model folder and a destination that would
    be replaced unasked, or is not a model folder."""
    missing = [part for part in MODEL_PARTS if not (folder / part).is_dir()]
    if missing:
        raise SanaCheckpointError(f"--model {folder}: not a model folder (no {', '.join(p + '/' for p in missing)} in it)")
    if out.resolve() == folder.resolve():
        raise SanaInputError(f"--out {out}: the same folder as --model; pack into another folder")
    if out.exists():
        if not overwrite:
            raise SanaInputError(f"--out {out}: exists; give --overwrite to replace it (or another --out)")
        foreign = [p.name for p in out.iterdir() if p.name not in (*MODEL_PARTS, *PACKED_FILES)] if out.is_dir() else [out.name]
        if foreign:
            raise SanaInputError(f"--out {out}: holds {', '.join(sorted(foreign)[:5])}, which a pack did not write; "
                                 "it is not replaced: give another --out")


def pack_model(folder: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """Copy a model folder's parts to `out` for shipping: the DiT and DC-AE weights cast to
    `dtype` (halving them; loaders cast back with `dtype=`), the text encoder folder and the
    small JSON files as they are. Written next to `out` first, then renamed into place."""
    from sana.dcae_io import load_dcae, save_dcae
    from sana.dit_io import load_dit, save_dit

    folder, out = Path(folder), Path(out)
    check_pack_paths(folder, out, overwrite)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # our own leftover from an interrupted pack
    staging.mkdir(parents=True)
    shutil.copytree(folder / "text_encoder", staging / "text_encoder")
    save_dcae(load_dcae(folder / "vae", dtype=torch.float32), staging / "vae", dtype=dtype)
    save_dit(load_dit(folder / "transformer", dtype=torch.float32).to(dtype), staging / "transformer")
    for name in PACKED_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, staging / name)
    if out.exists():  # checked above: a model folder we may replace; swapped, then removed
        previous = out.with_name(out.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous)
    else:
        staging.rename(out)
    return out
