"""Architectures of the embedded default model ("shapes-tiny") and the tiny text-encoder builder.

`build_text_encoder(folder, texts)` writes a Hugging Face Gemma-2 folder (config, safetensors,
tokenizer) that `sana.load_text_encoder` reads: a byte-level BPE tokenizer in Gemma's layout
(spaces as "▁", byte fallback, <bos> first, <pad> for padding) trained offline on `texts` plus
the complex human instruction, and a small Gemma-2 decoder with deterministic random weights.
A frozen random transformer keeps every token distinguishable (its states are dominated by
the token's own embedding), which is all the DiT needs to learn to read it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from sana.dcae import EVIT_BLOCK, RESBLOCK, DCAEConfig
from sana.dit import SanaDiTConfig
from sana.text_encoder import COMPLEX_HUMAN_INSTRUCTION, COMPLEX_HUMAN_INSTRUCTION_NVLABS

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, Gemma's order
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def build_tokenizer(folder: str | Path, texts: Iterable[str], *, vocab_size: int = 700, split_words: bool = True):
    """Train a Gemma-style BPE tokenizer on `texts` + the CHI (both cases) and save it into `folder`.

    `split_words=True` learns merges within words only (each "▁word" a unit, as Gemma's
    SentencePiece model does). Without it, BPE on a small, repetitive caption corpus merges
    whole phrases ("a▁large▁red▁circle▁" as one token), so a held-out combination of words
    tokenises into pieces never seen in training and the DiT cannot compose colour, shape and
    position; `tests/tiny_gemma.py` keeps the phrase-merging tokenizer its fixtures were built with.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import GemmaTokenizerFast

    corpus = ["\n".join(COMPLEX_HUMAN_INSTRUCTION), "\n".join(COMPLEX_HUMAN_INSTRUCTION_NVLABS), *texts]
    corpus += [t.lower() for t in corpus]  # SANA lowercases prompts before tokenising
    tokenizer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    # The normalizer has already turned spaces into "▁", so this split is on word starts.
    pattern = "▁" if split_words else " "
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=pattern, behavior="merged_with_next" if split_words else "merged_with_previous")
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + BYTE_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    vocab = tokenizer.get_vocab()
    trained = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained]
    fast = GemmaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    fast.save_pretrained(str(folder))
    return fast


def build_text_encoder(
    folder: str | Path,
    texts: Iterable[str] = (),
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 32,
    vocab_size: int = 700,
    seed: int = 0,
    causal_lm: bool = False,
    split_words: bool = True,
) -> Path:
    """Write a tiny Gemma-2 text-encoder folder (deterministic in `seed`); returns the folder.

    `causal_lm=True` saves a `Gemma2ForCausalLM` (laid out like google/gemma-2-2b-it);
    otherwise a bare `Gemma2Model` (like the `text_encoder/` of a diffusers SANA folder).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, texts, vocab_size=vocab_size, split_words=split_words)
    return save_gemma_weights(
        folder, tokenizer, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, seed=seed, causal_lm=causal_lm,
    )


def save_gemma_weights(
    folder: Path,
    tokenizer,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    seed: int = 0,
    causal_lm: bool = False,
) -> Path:
    """Random Gemma-2 weights and config for `tokenizer`'s vocabulary and special tokens, saved
    into `folder` beside the tokenizer files (deterministic in `seed`); the config's other values
    are transformers' Gemma2Config defaults (Gemma-2-2B's)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2Model

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
    (Gemma2ForCausalLM if causal_lm else Gemma2Model)(config).eval().save_pretrained(str(folder))
    return folder


def tiny_dcae_config(latent_channels: int = 32, widths: tuple[int, ...] = (8, 16, 32, 32, 64, 64)) -> DCAEConfig:
    """A DC-AE of the in/mix family, f = 2^(len(widths)−1) (f32 by default), one block per stage.

    Pixel (un)shuffle resampling with the residual shortcuts the DC-AE paper relies on;
    attention (EfficientViT blocks) only in the two deepest stages.
    """
    n = len(widths)
    return DCAEConfig(
        latent_channels=latent_channels,
        attention_head_dim=16,
        encoder_widths=widths,
        decoder_widths=widths,
        encoder_depths=(0,) + (1,) * (n - 1),
        decoder_depths=(0,) + (1,) * (n - 1),
        encoder_block_types=(RESBLOCK,) * (n - 2) + (EVIT_BLOCK,) * 2,
        decoder_block_types=(RESBLOCK,) * (n - 2) + (EVIT_BLOCK,) * 2,
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        decoder_norm_types=("rms_norm",) * n,
        decoder_act_fns=("silu",) * n,
        scaling_factor=1.0,
        name="shapes-tiny",
    )


def tiny_dit_config(latent_channels: int, caption_channels: int, sample_size: int, *, hidden_size: int = 128, depth: int = 6) -> SanaDiTConfig:
    """A small SANA DiT: 32-dim linear-attention heads, 4 cross-attention heads, sincos positional embedding."""
    heads = 4
    return SanaDiTConfig(
        hidden_size=hidden_size,
        depth=depth,
        attention_head_dim=32,
        cross_attention_heads=heads,
        cross_attention_head_dim=hidden_size // heads,
        caption_channels=caption_channels,
        in_channels=latent_channels,
        out_channels=latent_channels,
        sample_size=sample_size,
        interpolation_scale=1.0,  # sincos positions: at a few latent tokens, the conv padding alone says too little
        # flow_shift stays SANA's 3.0: a saved config does not store it and `load_dit` (hence
        # `sana.generate` and the nodes) assumes 3.0 below 4K, so training uses the same shift.
        variant="shapes-tiny",
    )
