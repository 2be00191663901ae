"""The DC-AE's config: `DCAEConfig` (every shape of the network) and `DCAE_PRESETS` (one per release).

Plain data, below both the network (`sana/dcae.py`) and its memory estimate and tiling
(`sana/dcae_tiling.py`), which read the same fields; `sana.dcae` re-exports the public names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import SanaInputError

# The kinds of stage block (the network builds them, the memory estimate counts them), norms
# and activations a config may name.
RESBLOCK = "ResBlock"
EVIT_BLOCK = "EfficientViTBlock"
_BLOCK_TYPES = (RESBLOCK, EVIT_BLOCK)
_NORM_TYPES = ("rms_norm", "batch_norm")
_ACT_TYPES = ("silu", "relu", "relu6")


@dataclass(frozen=True)
class DCAEConfig:
    """Everything that shapes a DC-AE. Stage i works at 1/2^i of the image side.

    `downsample_block_type` / `upsample_block_type` keep diffusers' semantics: only
    `"pixel_unshuffle"` selects the conv + pixel-unshuffle downsampler (anything else is the
    stride-2 conv, written `"conv"` here), and only `"interpolate"` selects nearest-×2 + conv
    upsampling (anything else is conv + pixel-shuffle, written `"pixel_shuffle"` here).
    A stage of depth 0 is empty: it has no blocks and no resampler.
    """

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_block_types: tuple[str, ...] = (RESBLOCK,) * 3 + (EVIT_BLOCK,) * 3
    decoder_block_types: tuple[str, ...] = (RESBLOCK,) * 3 + (EVIT_BLOCK,) * 3
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    downsample_block_type: str = "conv"
    upsample_block_type: str = "interpolate"
    decoder_norm_types: tuple[str, ...] = ("rms_norm",) * 6
    decoder_act_fns: tuple[str, ...] = ("silu",) * 6
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 0.41407
    name: str = "custom"

    def __post_init__(self) -> None:
        def tuplify(value):
            return tuple(tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value

        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, tuplify(getattr(self, f.name)))
        if self.downsample_block_type != "pixel_unshuffle":
            object.__setattr__(self, "downsample_block_type", "conv")
        if self.upsample_block_type != "interpolate":
            object.__setattr__(self, "upsample_block_type", "pixel_shuffle")
        n = len(self.encoder_widths)
        per_stage = {
            "decoder_widths": self.decoder_widths,
            "encoder_depths": self.encoder_depths,
            "decoder_depths": self.decoder_depths,
            "encoder_block_types": self.encoder_block_types,
            "decoder_block_types": self.decoder_block_types,
            "encoder_qkv_multiscales": self.encoder_qkv_multiscales,
            "decoder_qkv_multiscales": self.decoder_qkv_multiscales,
            "decoder_norm_types": self.decoder_norm_types,
            "decoder_act_fns": self.decoder_act_fns,
        }
        for name, value in per_stage.items():
            if len(value) != n:
                raise SanaInputError(f"DCAEConfig.{name} has {len(value)} entries, expected {n} (one per stage)")
        if n < 2:
            raise SanaInputError(f"DCAEConfig needs at least 2 stages, got {n}")
        for name in ("encoder_block_types", "decoder_block_types"):
            bad = [t for t in getattr(self, name) if t not in _BLOCK_TYPES]
            if bad:
                raise SanaInputError(f"DCAEConfig.{name}: unknown block types {bad} (known: {list(_BLOCK_TYPES)})")
        bad = [t for t in self.decoder_norm_types if t not in _NORM_TYPES]
        if bad:
            raise SanaInputError(f"DCAEConfig.decoder_norm_types: unknown norms {bad} (known: {list(_NORM_TYPES)})")
        bad = [t for t in (*self.decoder_act_fns, self.decoder_conv_act_fn) if t not in _ACT_TYPES]
        if bad:
            raise SanaInputError(f"DCAEConfig: unknown activations {bad} (known: {list(_ACT_TYPES)})")
        for side in ("encoder", "decoder"):
            widths = getattr(self, f"{side}_widths")
            depths = getattr(self, f"{side}_depths")
            if depths[-1] == 0:
                raise SanaInputError(f"DCAEConfig.{side}_depths: the deepest stage cannot be empty ({depths})")
            for i, (width, depth, kind) in enumerate(zip(widths, depths, getattr(self, f"{side}_block_types"))):
                if depth and kind == EVIT_BLOCK and width % self.attention_head_dim:
                    raise SanaInputError(
                        f"DCAEConfig: {side} stage {i} width {width} is not a multiple of "
                        f"attention_head_dim {self.attention_head_dim}"
                    )
        if self.encoder_widths[-1] % self.latent_channels or self.decoder_widths[-1] % self.latent_channels:
            raise SanaInputError(
                f"DCAEConfig: deepest widths {self.encoder_widths[-1]}/{self.decoder_widths[-1]} are not "
                f"multiples of latent_channels {self.latent_channels}"
            )

    @property
    def num_stages(self) -> int:
        return len(self.encoder_widths)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (self.num_stages - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DCAEConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SanaInputError(f"DCAEConfig: unknown fields {unknown}")
        return cls(**data)

    def replace(self, **changes) -> DCAEConfig:
        return dataclasses.replace(self, **changes)


def _in_mix_config(name: str, widths: tuple[int, ...], latent: int, scaling_factor: float) -> DCAEConfig:
    n = len(widths)
    deep = n - 3
    return DCAEConfig(
        latent_channels=latent,
        encoder_widths=widths,
        decoder_widths=widths,
        encoder_depths=(0, 4, 8) + (2,) * deep,
        decoder_depths=(0, 5, 10) + (2,) * deep,
        encoder_block_types=(RESBLOCK,) * 3 + (EVIT_BLOCK,) * deep,
        decoder_block_types=(RESBLOCK,) * 3 + (EVIT_BLOCK,) * deep,
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * deep,
        decoder_act_fns=("relu",) * 3 + ("silu",) * deep,
        scaling_factor=scaling_factor,
        name=name,
    )


_F32 = (128, 256, 512, 512, 1024, 1024)
_F64 = _F32 + (2048,)
_F128 = _F64 + (2048,)

# Every released DC-AE. sana-1.1 is a weights-only update of 1.0 (same architecture and
# scaling factor); "in" and "mix" share an architecture and differ only in scaling factor.
DCAE_PRESETS: dict[str, DCAEConfig] = {
    "dc-ae-f32c32-sana-1.0": DCAEConfig(name="dc-ae-f32c32-sana-1.0"),
    "dc-ae-f32c32-sana-1.1": DCAEConfig(name="dc-ae-f32c32-sana-1.1"),
    "dc-ae-f32c32-in-1.0": _in_mix_config("dc-ae-f32c32-in-1.0", _F32, 32, 0.3189),
    "dc-ae-f32c32-mix-1.0": _in_mix_config("dc-ae-f32c32-mix-1.0", _F32, 32, 0.4552),
    "dc-ae-f64c128-in-1.0": _in_mix_config("dc-ae-f64c128-in-1.0", _F64, 128, 0.2889),
    "dc-ae-f64c128-mix-1.0": _in_mix_config("dc-ae-f64c128-mix-1.0", _F64, 128, 0.4538),
    "dc-ae-f128c512-in-1.0": _in_mix_config("dc-ae-f128c512-in-1.0", _F128, 512, 0.4883),
    "dc-ae-f128c512-mix-1.0": _in_mix_config("dc-ae-f128c512-mix-1.0", _F128, 512, 0.3620),
}
