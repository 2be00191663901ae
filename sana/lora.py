"""LoRA for the SANA DiT in the diffusers / PEFT key layout.

File layout (what diffusers' `SanaPipeline.save_lora_weights` writes and `load_lora_weights`
reads): `transformer.<diffusers module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]
(4-D `[r, in, 1, 1]` / `[out, r, 1, 1]` for the 1×1 convs `ff.conv_inverted` / `ff.conv_point`),
e.g. `transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`. The effect on a module is
W += scale · (alpha / r) · B·A; files written here fold alpha/r into B and record
`lora_alpha == r` in the `lora_adapter_metadata`, so every loader applies the same update.

Our DiT fuses Q|K|V (and cross-attention K|V) into one linear layer; the module mapping
comes from `sana.dit_io.key_specs`, so a LoRA on `attn1.to_k` updates rows C..2C of
`blocks.{i}.attn.qkv`.

- `load_lora(model, path, scale)` merges a LoRA file into the model's weights (in place).
- `inject_lora(model, rank, alpha, targets)` adds trainable adapters (the trainer's path);
  `save_lora(model, path)` writes them; `merge_lora(model)` folds them in and removes them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import metadata_json, open_checkpoint, write_safetensors
from .dit import SanaDiT
from .dit_io import key_specs
from .errors import SanaCheckpointError, SanaInputError

PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoRATarget:
    """A diffusers module and where its output rows live in one of our weights."""

    module: str  # diffusers module name, e.g. "transformer_blocks.0.attn1.to_k"
    ours: str  # our parameter, e.g. "blocks.0.attn.qkv.weight"
    rows: tuple[int, int]  # [start, stop) rows of `ours` this module produces
    in_features: int
    conv: bool  # stored as a 1×1 conv (4-D LoRA weights) in the diffusers layout


def lora_targets(model: SanaDiT) -> dict[str, LoRATarget]:
    """Every module of the DiT a LoRA can adapt: the diffusers names of all linear layers and 1×1 convs."""
    targets: dict[str, LoRATarget] = {}
    for spec in key_specs(model.config, "diffusers"):
        if not spec.name.endswith(".weight") or len(spec.shape) != 2:
            continue
        start = 0
        for key, shape in spec.parts:
            module = key[: -len(".weight")]
            targets[module] = LoRATarget(module, spec.name, (start, start + shape[0]), spec.shape[1], len(shape) == 4)
            start += shape[0]
    return targets


def _matches(module: str, patterns: Sequence[str]) -> bool:
    """PEFT's rule: a target matches the full name or a dot-separated suffix of it."""
    return any(module == p or module.endswith("." + p) for p in patterns)


# --------------------------------------------------------------------------------------------
# Trainable adapters
# --------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen linear layer plus low-rank updates on row ranges of its output (one per diffusers module)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.rows: dict[str, tuple[int, int]] = {}
        self.modules_of: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` (dtype checks) keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add(self, target: LoRATarget, rank: int, alpha: float, generator: torch.Generator) -> None:
        key = target.module.replace(".", "__")
        out = target.rows[1] - target.rows[0]
        weight = self.base.weight
        a = torch.empty(rank, target.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's default init: B = 0, A ~ kaiming
        self.lora_A[key] = nn.Parameter(a.to(weight.device))
        self.lora_B[key] = nn.Parameter(torch.zeros(out, rank, device=weight.device))
        self.rows[key] = target.rows
        self.modules_of[key] = target.module
        self.scaling[key] = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        pieces, start = [], 0
        for key, (lo, hi) in sorted(self.rows.items(), key=lambda kv: kv[1][0]):
            if lo > start:
                pieces.append(torch.zeros(*x.shape[:-1], lo - start, dtype=out.dtype, device=out.device))
            a, b = self.lora_A[key], self.lora_B[key]
            pieces.append((x.to(a.dtype) @ a.t() @ b.t() * self.scaling[key]).to(out.dtype))
            start = hi
        if start < out.shape[-1]:
            pieces.append(torch.zeros(*x.shape[:-1], out.shape[-1] - start, dtype=out.dtype, device=out.device))
        return out + torch.cat(pieces, dim=-1)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def inject_lora(model: SanaDiT, *, rank: int, alpha: float | None = None, targets: Iterable[str] = ("to_q", "to_k", "to_v"),
                seed: int = 0) -> list[str]:
    """Wrap the targeted layers with trainable adapters (B = 0, so the model is unchanged); returns
    the diffusers module names adapted. Only the adapters require grad afterwards."""
    patterns = list(targets)
    chosen = [t for t in lora_targets(model).values() if _matches(t.module, patterns)]
    if not chosen:
        raise SanaInputError(f"LoRA targets {patterns} match no DiT module (e.g. to_q, to_k, to_v, to_out.0, conv_inverted)")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for target in chosen:
        layer_name = target.ours[: -len(".weight")]
        parent, leaf = _parent(model, layer_name)
        layer = getattr(parent, leaf)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            setattr(parent, leaf, layer)
        layer.add(target, rank, alpha if alpha else rank, generator)
    return [t.module for t in chosen]


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: SanaDiT) -> dict[str, torch.Tensor]:
    """The adapters in the diffusers/PEFT layout, alpha/r folded into B."""
    targets = lora_targets(model)
    state: dict[str, torch.Tensor] = {}
    for _, layer in _lora_layers(model):
        for key, module in layer.modules_of.items():
            a = layer.lora_A[key].detach().float()
            b = layer.lora_B[key].detach().float() * layer.scaling[key]
            if targets[module].conv:
                a, b = a[:, :, None, None], b[:, :, None, None]
            state[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
            state[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
    return state


def save_lora(model: SanaDiT, path: str | os.PathLike) -> None:
    """Write the adapters as a diffusers-loadable `.safetensors` (atomic)."""
    if Path(path).suffix.lower() != ".safetensors":
        # `load_lora` (and ComfyUI) would read another suffix as a pickle-based torch file.
        raise SanaInputError(f"LoRA files are .safetensors files, got {Path(path).name!r}")
    state = lora_state_dict(model)
    if not state:
        raise SanaInputError("the model has no LoRA adapters (call inject_lora first)")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    modules = sorted({k[len(PREFIX) : -len(".lora_A.weight")] for k in state if k.endswith("lora_A.weight")})
    rank = max(ranks)
    metadata = {f"{PREFIX}r": rank, f"{PREFIX}lora_alpha": rank, f"{PREFIX}target_modules": modules}
    write_safetensors(Path(path), state, {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def merge_lora(model: SanaDiT) -> SanaDiT:
    """Fold the trainable adapters into the base weights and remove them."""
    for name, layer in _lora_layers(model):
        with torch.no_grad():
            for key, (lo, hi) in layer.rows.items():
                delta = layer.lora_B[key].float() @ layer.lora_A[key].float() * layer.scaling[key]
                layer.base.weight[lo:hi] += delta.to(layer.base.weight.dtype)
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, layer.base)
    return model


# --------------------------------------------------------------------------------------------
# Loading a LoRA file into a model
# --------------------------------------------------------------------------------------------

_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def _alphas(metadata: dict[str, str]) -> tuple[float | None, dict[str, float], dict[str, int]]:
    """(lora_alpha, alpha_pattern, rank_pattern) from diffusers' adapter metadata, if any."""
    if not metadata.get(METADATA_KEY):
        return None, {}, {}
    data = metadata_json(metadata, METADATA_KEY, f"'{METADATA_KEY}' metadata")
    data = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in data.items()}
    alpha, alpha_pattern, rank_pattern = data.get("lora_alpha"), data.get("alpha_pattern") or {}, data.get("rank_pattern") or {}
    numbers = [alpha] if alpha is not None else []
    if not isinstance(alpha_pattern, dict) or not isinstance(rank_pattern, dict):
        raise SanaCheckpointError(f"corrupt '{METADATA_KEY}' metadata: alpha_pattern and rank_pattern must be objects")
    numbers += alpha_pattern.values()
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) for n in numbers):
        raise SanaCheckpointError(f"corrupt '{METADATA_KEY}' metadata: lora_alpha and alpha_pattern must hold numbers")
    return alpha, alpha_pattern, rank_pattern


def lora_alpha(module: str, rank: int, metadata: dict[str, str]) -> float:
    """The alpha a LoRA file gives `module`: PEFT's `alpha_pattern`, then `lora_alpha`, else the rank
    (diffusers' rule when a file carries no adapter metadata)."""
    default_alpha, alpha_pattern, _ = _alphas(metadata)
    return next(
        (v for p, v in alpha_pattern.items() if _matches(module, [p])),
        default_alpha if default_alpha is not None else rank,
    )


def load_lora(model: SanaDiT, path: str | os.PathLike, scale: float = 1.0) -> SanaDiT:
    """Merge a diffusers/PEFT-layout LoRA file into `model`'s weights (in place) and return it.

    Each adapted module gets W += scale · (alpha / r) · B·A, with alpha from the file's
    `lora_adapter_metadata` (PEFT's `lora_alpha` and `alpha_pattern`) or, as diffusers does
    without metadata, alpha = r. Raises `SanaCheckpointError` for keys naming no DiT module or
    shapes that do not fit, before changing any weight.
    """
    reader = open_checkpoint(path)
    try:
        _alphas(reader.metadata)  # checked once here, so the loop below cannot fail half-way
    except SanaCheckpointError as e:
        raise SanaCheckpointError(f"{path}: {e}") from None
    targets = lora_targets(model)
    pairs: dict[str, dict[str, str]] = {}
    ignored = []
    for key in reader.keys():
        match = _KEY.match(key)
        if not match:
            if key.endswith(".alpha") or "lora" not in key:
                ignored.append(key)
                continue
            raise SanaCheckpointError(f"{path}: key {key!r} is not in the diffusers/PEFT LoRA layout (…lora_A.weight / …lora_B.weight)")
        pairs.setdefault(match["module"], {})[match["ab"]] = key
    if not pairs:
        raise SanaCheckpointError(f"{path}: no LoRA weights (keys like transformer.transformer_blocks.0.attn1.to_q.lora_A.weight)")
    updates: list[tuple[LoRATarget, torch.Tensor]] = []
    for module, ab in sorted(pairs.items()):
        if module not in targets:
            raise SanaCheckpointError(f"{path}: LoRA for {module!r}, which is not a linear layer of this DiT")
        if set(ab) != {"A", "B"}:
            raise SanaCheckpointError(f"{path}: {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        target = targets[module]
        bad_rank = [key for key in (ab["A"], ab["B"]) if len(reader.shape(key)) not in (2, 4)]
        if bad_rank:
            raise SanaCheckpointError(f"{path}: {bad_rank[0]!r} has shape {list(reader.shape(bad_rank[0]))}; LoRA weights are 2-D (or 4-D 1×1 convs)")
        a, b = reader.read(ab["A"]).float(), reader.read(ab["B"]).float()
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        rank, out = a.shape[0], target.rows[1] - target.rows[0]
        if a.shape[1] != target.in_features or b.shape != (out, rank):
            raise SanaCheckpointError(
                f"{path}: {module!r} LoRA shapes A{list(a.shape)} B{list(b.shape)} do not fit a [{out}, {target.in_features}] layer"
            )
        alpha = lora_alpha(module, rank, reader.metadata)
        updates.append((target, (b @ a) * (scale * alpha / rank)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for target, delta in updates:
            weight = params[target.ours]
            lo, hi = target.rows
            weight[lo:hi] += delta.to(weight.device, weight.dtype)
    return model


__all__ = [
    "LoRALinear",
    "inject_lora",
    "load_lora",
    "lora_alpha",
    "lora_state_dict",
    "lora_targets",
    "merge_lora",
    "save_lora",
]
