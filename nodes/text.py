"""What the Gemma text-encode nodes compute (no ComfyUI): the CHI widget and CONDITIONING lists."""

from __future__ import annotations

from ..sana.errors import SanaInputError
from ..sana.text_encoder import TextEncoder


def chi_argument(chi: str, custom_chi: str = "") -> bool | str:
    """The `TextEncoder.encode(chi=...)` value for the node's CHI combo: preset -> True, off -> False,
    custom -> the custom text (an empty custom text means no CHI)."""
    if chi == "preset":
        return True
    if chi == "off":
        return False
    if chi == "custom":
        return custom_chi if custom_chi.strip() else False
    raise SanaInputError(f"unknown CHI mode {chi!r}; expected preset, off or custom")


def encode_conditioning(text_encoder: TextEncoder, text: str, *, chi: bool | str, max_tokens: int) -> list:
    """CONDITIONING `[[embeds [1, L, H], {"attention_mask": mask [1, L]}]]` on the CPU.

    Each conditioning keeps its own mask, so when ComfyUI batches cond and uncond together every
    row is masked by its own prompt's length (the ExtraModels nodes used one length for all rows).
    """
    embeds, mask = text_encoder.encode([text], chi=chi, max_length=max_tokens)
    return [[embeds.cpu(), {"attention_mask": mask.cpu()}]]


__all__ = ["chi_argument", "encode_conditioning"]
