"""SANA ControlNet: spatial control (edges, depth, ...) for a SANA DiT.

The ControlNet is a trainable copy of the DiT's first N blocks (7 in NVlabs' releases) with the
DiT's input side (patch, timestep and caption embeddings), fed the same noisy latents, timestep
and caption as the DiT, plus the control image's latents (the control image through the DC-AE,
times its scaling factor) through the same patch embedding and a zero-initialised projection
(`input_proj`). After copied block k, a zero-initialised projection (`output_projs[k]`) of its
hidden states, times the conditioning scale, is the residual added to the DiT's hidden states
after DiT block k + 1. At initialisation every residual is exactly zero, so a ControlNet built
from a DiT (`SanaControlNet.from_dit`) starts as a no-op and training grows it.

Numerics follow diffusers' `SanaControlNetModel` (the project's reference), which differs from
NVlabs' `SanaMSControlNet` in one place: NVlabs feeds the control branch the hidden states after
DiT block 0 (plus the projected control), diffusers the patch-embedded latents themselves (plus
the projected control). The residual positions (after DiT blocks 1..N) agree.

Parameter names: `x_embedder`, `t_embedder`, `t_block`, `y_embedder`, `attention_y_norm` and
`blocks.{k}` are the DiT's (`sana.dit.DiTInputs`, `SanaBlock`); `input_proj` is NVlabs'
`controlnet.0.before_proj` (diffusers' `input_block`) and `output_projs.{k}` NVlabs'
`controlnet.{k}.after_proj` (diffusers' `controlnet_blocks.{k}`). `sana/controlnet_io.py` maps
the file layouts onto these names.

The config is the `SanaDiTConfig` of the blocks it copies, with `depth` the number of copied
blocks; a ControlNet has no Sprint guidance embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from .dit import DIT_PRESETS, DiTInputs, SanaBlock, SanaDiT, SanaDiTConfig
from .errors import SanaCheckpointError, SanaInputError
from .ops import Linear

# The released ControlNets copy the first 7 blocks (NVlabs' `copy_blocks_num`).
RELEASED_CONTROL_BLOCKS = 7

CONTROLNET_PRESETS: dict[str, SanaDiTConfig] = {
    f"{base}-controlnet": DIT_PRESETS[base].replace(depth=RELEASED_CONTROL_BLOCKS, variant=f"{base}-controlnet")
    for base in ("sana-600m-1024", "sana-1600m-1024")
}


def controlnet_variant_name(config: SanaDiTConfig) -> str:
    """The released ControlNet a config matches, or "custom"."""
    for name, preset in CONTROLNET_PRESETS.items():
        if preset.replace(variant=config.variant, flow_shift=config.flow_shift) == config:
            return name
    return "custom"


class SanaControlNet(DiTInputs):
    """The SANA ControlNet (see the module docstring).

    `forward(x, timestep, context, control, context_mask=None, scale=1.0, trim_context=None)`
    takes the DiT's arguments (x `[B, in_channels, h, w]`, timestep `[B]` or one value, context
    `[B, L, caption_channels]`, context_mask `[B, L]`, trim_context) and `control`, the control
    latents `[B or 1, in_channels, h, w]` in the DiT's latent space. It returns the residuals in
    the form `SanaDiT(block_residuals=...)` takes: a list of depth + 1 entries whose entry i is
    added after DiT block i, the first None and entry k + 1 `scale` times the projection of
    copied block k's output `[B, h·w, C]`.
    """

    def __init__(self, config: SanaDiTConfig):
        if config.guidance_embeds:
            raise SanaInputError("a SANA ControlNet has no guidance embedding (SANA-Sprint): build it with guidance_embeds=False")
        super().__init__(config)
        C = config.hidden_size
        self.blocks = nn.ModuleList(SanaBlock(config) for _ in range(config.depth))
        self.input_proj = Linear(C, C)
        self.output_projs = nn.ModuleList(Linear(C, C) for _ in range(config.depth))
        # Zero projections: a new ControlNet adds exactly nothing until it is trained.
        for projection in (self.input_proj, *self.output_projs):
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)

    @classmethod
    def from_dit(cls, dit: SanaDiT, blocks: int = RELEASED_CONTROL_BLOCKS) -> SanaControlNet:
        """A ControlNet for `dit`, ready to train: the DiT's input side and first `blocks` blocks
        copied, the projections zero (so it changes nothing yet), in the DiT's dtype and device.
        Raises `SanaInputError` for a block count outside [1, depth - 1] (the last residual goes
        after DiT block `blocks`) and for a SANA-Sprint DiT."""
        depth = dit.config.depth
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks < depth:
            raise SanaInputError(f"blocks must be an integer in [1, {depth - 1}] for a DiT of {depth} blocks, got {blocks!r}")
        config = dit.config.replace(depth=blocks)
        controlnet = cls(config.replace(variant=controlnet_variant_name(config))).to(device=dit.device, dtype=dit.dtype)
        # Every tensor but the zero projections has a DiT tensor of the same name (load_state_dict copies it).
        wanted = {name for name in controlnet.state_dict() if not name.startswith(("input_proj.", "output_projs."))}
        copied = {name: tensor for name, tensor in dit.state_dict().items() if name in wanted}
        if set(copied) != wanted or not all(tensor.is_floating_point() for tensor in copied.values()):
            raise SanaInputError(
                "only a float SanaDiT can seed a ControlNet (a W8A8 DiT holds int8 weights and scales instead; "
                f"missing: {sorted(wanted - set(copied))[:4]})"
            )
        controlnet.load_state_dict(copied, strict=False)
        return controlnet.train(dit.training)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        control: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        scale: float = 1.0,
        trim_context: bool | None = None,
    ) -> list[torch.Tensor | None]:
        B = x.shape[0]
        if control.ndim != 4 or control.shape[0] not in (1, B) or control.shape[2:] != x.shape[2:]:
            raise SanaInputError(
                f"control latents have shape {list(control.shape)}; for x of shape {list(x.shape)} they must be "
                f"[{B} or 1, {x.shape[1]}, {x.shape[2]}, {x.shape[3]}]"
            )
        tokens, h, w = self.embed_latents(x)
        control_tokens, _, _ = self.embed_latents(control, "control")
        tokens = tokens + self.input_proj(control_tokens)  # a [1, N, C] control broadcasts over the batch
        _, t_mod = self.embed_timestep(timestep, B)
        context, mask_bias = self.embed_caption(context, context_mask, trim_context)
        residuals: list[torch.Tensor | None] = [None]
        for block, projection in zip(self.blocks, self.output_projs):
            tokens = self.run_block(block, tokens, context, t_mod, mask_bias, h, w)
            residuals.append(projection(tokens) * scale)  # before the next block updates `tokens` in place
        return residuals


def check_controlnet_fits(controlnet: SanaControlNet, dit: SanaDiT) -> None:
    """Raise `SanaCheckpointError` naming both sides when `controlnet` cannot control `dit`: a
    different width, latent or caption channels, patch size, or as many copied blocks as the
    DiT has (its last residual goes after DiT block `depth`)."""
    ours, theirs = controlnet.config, dit.config
    for field in ("hidden_size", "in_channels", "caption_channels", "patch_size"):
        if getattr(ours, field) != getattr(theirs, field):
            raise SanaCheckpointError(
                f"the ControlNet ({ours.variant}) has {field} {getattr(ours, field)}, the DiT ({theirs.variant}) "
                f"{getattr(theirs, field)}: a ControlNet controls the DiT family it was trained on"
            )
    if ours.depth >= theirs.depth:
        raise SanaCheckpointError(
            f"the ControlNet ({ours.variant}) copies {ours.depth} blocks, but the DiT ({theirs.variant}) has only "
            f"{theirs.depth}: its residuals go after DiT blocks 1..{ours.depth}"
        )


__all__ = ["CONTROLNET_PRESETS", "RELEASED_CONTROL_BLOCKS", "SanaControlNet", "check_controlnet_fits", "controlnet_variant_name"]
