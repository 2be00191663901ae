"""Builds a tiny random Gemma-2 text encoder folder offline, for tests.

`build_tiny_gemma(folder)` writes what a Hugging Face Gemma-2 folder holds: `config.json`,
`model.safetensors` and the tokenizer files, with `trainer.tiny_models.build_text_encoder`
(the builder of the embedded default model's text encoder: a real byte-level BPE in Gemma's
layout trained on a corpus holding the complex human instruction in both quote styles, so CHI
prompts tokenise into many sub-word tokens rather than <unk>). Here the corpus adds a few
general prompts, and the sizes are smaller. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from trainer.tiny_models import build_text_encoder

SAMPLE_PROMPTS = [
    "A cat sleeping on a sunny windowsill.",
    "A painting of a squirrel eating a burger.",
    "An astronaut riding a horse on the moon, detailed, 4k, cinematic lighting!",
    "A busy city street at dusk with glowing street lamps and a double-decker bus.",
    "Close-up portrait of an old fisherman, dramatic shadows (film grain) -- 35mm.",
    "Sunset over the ocean; pink and orange clouds, calm water, a small boat.",
    "a cute robot holding a red balloon in a snowy forest",
]


def build_tiny_gemma(
    folder: str | Path,
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 16,
    causal_lm: bool = False,
    vocab_size: int = 700,
    seed: int = 0,
    extra_texts: Iterable[str] = (),
) -> Path:
    """Write a tiny random Gemma-2 folder (config, safetensors weights, tokenizer) to `folder`.

    `causal_lm=True` saves a `Gemma2ForCausalLM` (like google/gemma-2-2b-it); otherwise a bare
    `Gemma2Model`. Deterministic in `seed`. The attention implementation is not stored; pick it
    when loading (the parity tests use "eager", as diffusers' own tiny-Gemma tests do).
    """
    return build_text_encoder(
        folder,
        [*SAMPLE_PROMPTS, *extra_texts],
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        seed=seed,
        causal_lm=causal_lm,
        split_words=False,  # the tokenizer these fixtures were written against (see build_tokenizer)
    )
