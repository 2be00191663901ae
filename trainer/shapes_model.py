"""The embedded default model as one object: a model folder's three parts, text to image with
`sana.generate` (as the nodes do), and `demo`, the labelled PNG grid of `python -m trainer demo`
(with a trained LoRA merged in, `--lora`).

`SHIPPED_MODEL_DIR` (`assets/shapes-tiny`) is the model the repository ships, built by the
shapes-tiny preset (`trainer.preset`) and packed (`trainer.pack`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sana.errors import SanaCheckpointError

from .options import output_folder
from .plotting import image_grid, to_uint8

# The embedded default model: built by the shapes-tiny preset, packed (`pack_model`) and shipped
# with the repository, so that `python -m trainer demo` needs no training.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes-tiny"
DEFAULT_DEMO_PROMPTS = (
    "a large red circle on the left",
    "a small blue square at the top",
    "a large yellow triangle on the right",
    "a large green square at the bottom",
    "a small purple circle in the center",
    "two cyan triangles",
    "three red squares",
    "a large blue triangle in the center",
)
MODEL_PARTS = ("text_encoder", "vae", "transformer")


@dataclass
class ShapesModel:
    """A model folder's three parts, loaded once, and the image side it was trained at."""

    dit: torch.nn.Module
    dcae: torch.nn.Module
    text_encoder: object
    side: int

    @classmethod
    def load(cls, folder: str | Path) -> "ShapesModel":
        from sana.dcae_io import load_dcae
        from sana.dit_io import load_dit
        from sana.text_encoder import load_text_encoder

        folder = Path(folder)
        for part in MODEL_PARTS:
            if not (folder / part).is_dir():
                raise SanaCheckpointError(f"{folder} has no {part}/ folder: not a model folder")
        dit = load_dit(folder / "transformer", dtype=torch.float32)
        dcae = load_dcae(folder / "vae", dtype=torch.float32)
        index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
        side = index.get("image_size") or dit.config.sample_size * dcae.spatial_compression
        return cls(dit, dcae, load_text_encoder(folder / "text_encoder", dtype=torch.float32), int(side))

    def __call__(self, prompts: Sequence[str], *, seed: int = 0, steps: int = 20, guidance_scale: float = 4.5,
                 controlnet=None, control_image: torch.Tensor | None = None) -> list[np.ndarray]:
        """uint8 [side, side, 3] images, one per prompt, with `sana.generate` (the library's
        text-to-image; with a ControlNet and control images [B, side, side, 3] in [0, 1], steered)."""
        from sana.pipeline import generate

        # The shapes world's size (e.g. 128 px) is outside SANA's aspect-ratio bins, hence no binning.
        control = {} if controlnet is None else {"controlnet": controlnet, "control_image": control_image}
        images = generate(dit=self.dit, dcae=self.dcae, text_encoder=self.text_encoder, prompt=list(prompts),
                          height=self.side, width=self.side, steps=steps, guidance_scale=guidance_scale, seed=seed,
                          resolution_binning=False, **control)
        return to_uint8(images)


def demo(folder: str | Path, prompts: Sequence[str], out_png: str | Path, *, seed: int = 0, steps: int = 20,
         guidance_scale: float = 4.5, lora: str | Path | None = None) -> Path:
    """Write a PNG grid of `prompts` (each image labelled with its prompt), with a trained LoRA
    file merged into the DiT when `lora` names one (`sana.load_lora`, as ComfyUI's loader does)."""
    out_png = Path(out_png)
    output_folder(out_png.parent, "--out")  # before the work: a bad folder fails first
    model = ShapesModel.load(folder)
    if lora is not None:
        from sana.lora import load_lora

        load_lora(model.dit, lora)
    images = model(list(prompts), seed=seed, steps=steps, guidance_scale=guidance_scale)
    image_grid(images, list(prompts), columns=4, scale=max(1, 128 // images[0].shape[0])).save(out_png)
    return out_png
