"""Builds a tiny random Gemma-2 text encoder folder offline, for tests.

`build_tiny_gemma(folder)` writes what a Hugging Face Gemma-2 folder holds: `config.json`,
`model.safetensors` and the tokenizer files, with `trainer.tiny_models.build_text_encoder`
(the builder of the embedded default model's text encoder: a real byte-level BPE in Gemma's
layout trained on a corpus holding the complex human instruction in both quote styles, so CHI
prompts tokenise into many sub-word tokens rather than <unk>). Here the corpus adds a few
general prompts, and the sizes are smaller. Nothing is downloaded.

For the single-file form ComfyUI users have (`gemma_2_2b_fp16.safetensors`, which carries its
tokenizer as the bytes of a SentencePiece model): `train_spiece_model` trains a tiny
SentencePiece model in Gemma's layout, `build_spiece_gemma` writes a Gemma-2 folder around it
(tokenizer.model and the tokenizer.json transformers converts it to, as google/gemma-2-2b-it
ships both), and `write_comfy_gemma_file` writes that folder's weights and tokenizer as the one
file, in ComfyUI's exact key names.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import torch

from trainer.tiny_models import build_text_encoder, save_gemma_weights

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


def train_spiece_model(texts: Iterable[str] = (), *, vocab_size: int = 700) -> bytes:
    """A SentencePiece BPE model in Gemma's layout, trained offline on `texts` + the CHI (both
    quote styles, both cases); returns its serialized proto (what a `tokenizer.model` holds).

    Gemma's layout: <pad> <eos> <bos> <unk> <mask> as ids 0-4, byte fallback, no dummy prefix,
    whitespace kept as is, no normalisation."""
    import sentencepiece

    from sana.text_encoder import COMPLEX_HUMAN_INSTRUCTION, COMPLEX_HUMAN_INSTRUCTION_NVLABS

    corpus = ["\n".join(COMPLEX_HUMAN_INSTRUCTION), "\n".join(COMPLEX_HUMAN_INSTRUCTION_NVLABS), *SAMPLE_PROMPTS, *texts]
    corpus += [t.lower() for t in corpus]  # SANA lowercases prompts before tokenising
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=proto,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>"],
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return proto.getvalue()


def spiece_to_tokenizer_json(proto: bytes):
    """The transformers Gemma tokenizer (tokenizer.json form) of a SentencePiece BPE model, by
    transformers' own conversion (the vocabulary in id order, merges by `generate_merges`), as
    google/gemma-2-2b-it's tokenizer.json was made from its tokenizer.model. Needs no protobuf."""
    import sentencepiece
    from transformers import GemmaTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    return GemmaTokenizerFast(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, add_eos_token=False)


def build_spiece_gemma(
    folder: str | Path,
    proto: bytes,
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 16,
    causal_lm: bool = False,
    seed: int = 0,
) -> Path:
    """A tiny random Gemma-2 folder whose tokenizer is the SentencePiece model `proto`: config.json,
    model.safetensors, tokenizer.model and its tokenizer.json, as google/gemma-2-2b-it lays them out.
    The config's other values are transformers' Gemma2Config defaults (Gemma-2-2B's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = spiece_to_tokenizer_json(proto)
    tokenizer.save_pretrained(str(folder))
    (folder / "tokenizer.model").write_bytes(proto)
    return save_gemma_weights(
        folder, tokenizer, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, seed=seed, causal_lm=causal_lm,
    )


def comfy_gemma_tensors(folder: str | Path, *, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors of ComfyUI's single-file Gemma-2 (gemma_2_2b_fp16.safetensors, Lumina Image 2.0's
    text encoder) for the Gemma folder `folder`: every decoder weight under `model.` (the names
    ComfyUI's `detect_te_model` and `Gemma2_2B` use), in `dtype`, and the folder's tokenizer.model
    bytes as the 1-D uint8 tensor `spiece_model` (what `SPieceTokenizer.serialize_model` writes)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / "model.safetensors"))
    tensors = {f"model.{name.removeprefix('model.')}": t.to(dtype) for name, t in weights.items() if name != "lm_head.weight"}
    tensors["spiece_model"] = torch.frombuffer(bytearray((folder / "tokenizer.model").read_bytes()), dtype=torch.uint8)
    return tensors


def write_comfy_gemma_file(folder: str | Path, path: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write `comfy_gemma_tensors(folder)` as one safetensors file at `path`."""
    from safetensors.torch import save_file

    save_file(comfy_gemma_tensors(folder, dtype=dtype), str(path))
    return Path(path)
