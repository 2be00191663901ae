"""Builds a tiny random Gemma-2 text encoder folder offline, for tests and defaults.

`build_tiny_gemma(folder)` writes what a Hugging Face Gemma-2 folder holds: `config.json`,
`model.safetensors` and the tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` where transformers writes it). The tokenizer is a real byte-level
BPE in Gemma's layout (spaces normalised to "▁", byte fallback, <bos> prepended, <pad> for
padding; like the real one it saves padding_side="left", and SANA's encoder pads right
explicitly), trained here on a small corpus that contains the complex human
instruction in both quote styles, so CHI prompts tokenise into many sub-word tokens rather
than <unk>. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2Model, GemmaTokenizerFast

from sana.text_encoder import COMPLEX_HUMAN_INSTRUCTION, COMPLEX_HUMAN_INSTRUCTION_NVLABS

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, Gemma's order
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

SAMPLE_PROMPTS = [
    "A cat sleeping on a sunny windowsill.",
    "A painting of a squirrel eating a burger.",
    "An astronaut riding a horse on the moon, detailed, 4k, cinematic lighting!",
    "A busy city street at dusk with glowing street lamps and a double-decker bus.",
    "Close-up portrait of an old fisherman, dramatic shadows (film grain) -- 35mm.",
    "Sunset over the ocean; pink and orange clouds, calm water, a small boat.",
    "a cute robot holding a red balloon in a snowy forest",
]


def _corpus(extra: Iterable[str]) -> list[str]:
    texts = ["\n".join(COMPLEX_HUMAN_INSTRUCTION), "\n".join(COMPLEX_HUMAN_INSTRUCTION_NVLABS), *SAMPLE_PROMPTS, *extra]
    # diffusers lowercases prompts before tokenising; train on both cases.
    return texts + [t.lower() for t in texts]


def build_tiny_tokenizer(folder: str | Path, *, vocab_size: int = 700, extra_texts: Iterable[str] = ()) -> GemmaTokenizerFast:
    """Train a small Gemma-style BPE tokenizer and save it into `folder`."""
    trainer_tokenizer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(_corpus(extra_texts), trainer=trainer)
    vocab = trainer_tokenizer.get_vocab()
    trained = json.loads(trainer_tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained]
    tokenizer = GemmaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


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
    `Gemma2Model` (like the `text_encoder/` of a diffusers SANA folder). Deterministic in `seed`.
    The attention implementation is not stored; pick it when loading (the parity tests use
    "eager", as diffusers' own tiny-Gemma tests do). Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(folder, vocab_size=vocab_size, extra_texts=extra_texts)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = (Gemma2ForCausalLM if causal_lm else Gemma2Model)(config).eval()
    model.save_pretrained(str(folder))
    return folder
