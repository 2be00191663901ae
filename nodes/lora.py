"""What Sana LoRA Loader needs besides ComfyUI (no ComfyUI imported): the key map and alphas that let
`comfy.lora.load_lora` patch a SANA DiT exactly as `sana.load_lora` merges the same file."""

from __future__ import annotations

import torch

from ..sana.lora import lora_alpha, lora_targets


def lora_patch_keys(dit, weight_prefix: str) -> dict[str, str | tuple[str, tuple[int, int, int]]]:
    """ComfyUI's LoRA key map for a SANA DiT: each diffusers/PEFT module name (with and without the
    `transformer.` prefix) → the model weight it adapts, with (dim 0, first row, rows) inside our
    fused Q|K|V and cross-attention K|V weights, so `comfy.lora.load_lora` patches the right rows."""
    key_map: dict[str, str | tuple[str, tuple[int, int, int]]] = {}
    for module, target in lora_targets(dit).items():
        start, stop = target.rows
        weight = f"{weight_prefix}{target.ours}"
        fused = (start, stop) != (0, dit.get_parameter(target.ours).shape[0])
        for prefix in ("transformer.", ""):
            key_map[prefix + module] = (weight, (0, start, stop - start)) if fused else weight
    return key_map


def lora_alpha_entries(lora_state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """`<module>.alpha` entries carrying the alpha a file's adapter metadata gives each module (ComfyUI
    reads alphas from such keys only), so ComfyUI applies the same update as `sana.load_lora`."""
    entries: dict[str, torch.Tensor] = {}
    for key, tensor in lora_state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_key = key[: -len(".lora_A.weight")]
        if f"{module_key}.alpha" in lora_state:
            continue
        module = module_key[len("transformer.") :] if module_key.startswith("transformer.") else module_key
        entries[f"{module_key}.alpha"] = torch.tensor(float(lora_alpha(module, tensor.shape[0], metadata)))
    return entries


__all__ = ["lora_alpha_entries", "lora_patch_keys"]
