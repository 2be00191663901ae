"""Gemma-2 text conditioning for SANA, with the complex human instruction (CHI).

`load_text_encoder(folder)` loads a Gemma-2 decoder and its tokenizer from a local folder
(never the hub); `TextEncoder.encode` turns prompts into the [B, max_length, hidden] states
and [B, max_length] mask the DiT cross-attends to, exactly as diffusers' `SanaPipeline`
computes them:

1. prompts are stripped and, by default, lowercased (diffusers with `clean_caption=False`;
   NVlabs only strips, so pass `lowercase=False` for NVlabs behaviour);
2. the CHI text is prepended with no separator, and the batch is right-padded / truncated to
   `len(tokenize(CHI)) + max_length - 2` tokens (BOS included);
3. Gemma's last hidden state (after the final norm) is taken, and of every row only the BOS
   position and the last `max_length - 1` positions are kept, the mask cut the same way.
   This drops the CHI body: what stays is BOS, the prompt tokens and the padding.

Negative prompts are encoded with `chi=False` (plain `max_length` tokens, nothing dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointReader,
    check_config_values,
    dominant_float_dtype,
    open_checkpoint,
    read_json_file,
    read_shard_index,
    shorten,
)
from .errors import SanaCheckpointError, SanaInputError

# The CHI as diffusers' SanaPipeline / SanaSprintPipeline / SanaPAGPipeline default it. It is
# the default here so embeddings match diffusers token for token.
COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
)

# The NVlabs config text (`text_encoder.chi_prompt`): the same lines with "Enhanced prompt" in
# double quotes. Different token ids, so different prompt states (they attend to the CHI).
COMPLEX_HUMAN_INSTRUCTION_NVLABS: tuple[str, ...] = (
    COMPLEX_HUMAN_INSTRUCTION[0].replace("'Enhanced prompt'", '"Enhanced prompt"'),
    *COMPLEX_HUMAN_INSTRUCTION[1:],
)

DEFAULT_MAX_LENGTH = 300
# The CHI's tokenisation counts BOS and its trailing "User Prompt: " ends in a token that the
# prompt re-tokenises with; both are not part of the 300 prompt positions.
CHI_OVERLAP_TOKENS = 2

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

ChiSpec = bool | str | Sequence[str] | None


def chi_text(chi: ChiSpec) -> str:
    """The instruction string for a `chi` argument: True -> the default (diffusers) CHI,
    False/None/"" -> none, a string -> itself, a sequence of lines -> the lines joined by "\\n"."""
    if chi is True:
        return "\n".join(COMPLEX_HUMAN_INSTRUCTION)
    if not chi:
        return ""
    if isinstance(chi, str):
        return chi
    return "\n".join(chi)


@dataclass
class TextEncoder:
    """A loaded Gemma-2 decoder and its tokenizer. Build with `load_text_encoder`."""

    model: torch.nn.Module
    tokenizer: object
    folder: Path

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(
        self,
        prompts: str | Sequence[str],
        *,
        chi: ChiSpec = True,
        max_length: int = DEFAULT_MAX_LENGTH,
        lowercase: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts into (embeds [B, max_length, hidden], mask [B, max_length]).

        `chi`: True for the default CHI (diffusers' text), False for none (negative prompts),
        or a custom instruction (string or lines). `lowercase=True` matches diffusers
        (`text.lower().strip()`); False matches NVlabs (`strip()` only). The embeddings are in
        the encoder's dtype, the mask is int64 (1 = attend), both on the encoder's device.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise SanaInputError("encode() needs at least one prompt")
        if max_length < 2:
            raise SanaInputError(f"max_length must be at least 2 (BOS plus one token), got {max_length}")
        texts = [(p.lower() if lowercase else p).strip() for p in prompts]
        instruction = chi_text(chi)
        total_length = max_length
        if instruction:
            texts = [instruction + t for t in texts]
            total_length = len(self.tokenizer.encode(instruction)) + max_length - CHI_OVERLAP_TOKENS
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=total_length,
            truncation=True,
            add_special_tokens=True,
            padding_side="right",
            return_tensors="pt",
        )
        device = self.device
        mask = tokens.attention_mask.to(device)
        states = self.model(tokens.input_ids.to(device), attention_mask=mask)[0].to(self.dtype)
        keep = [0, *range(total_length - max_length + 1, total_length)]
        return states[:, keep], mask[:, keep]


def _resolve_folders(folder: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder): a model folder holding both, or a diffusers pipeline
    root with `text_encoder/` and `tokenizer/`."""
    if (folder / "text_encoder").is_dir():
        tokenizer_folder = folder / "tokenizer"
        return folder / "text_encoder", tokenizer_folder if tokenizer_folder.is_dir() else folder
    return folder, folder


# Far above Gemma-2 27B (46 layers, 4608 wide, 256k vocabulary), so a damaged or hostile
# config.json is refused before transformers allocates a model from it.
_CONFIG_BOUNDS: dict[str, tuple[float, float]] = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 65536),
    "intermediate_size": (1, 1 << 20),
    "vocab_size": (1, 1 << 22),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 4096),
}


def _read_config(model_folder: Path) -> dict:
    """`config.json`, checked to describe a Gemma-2 of sane size."""
    path = model_folder / "config.json"
    if not path.is_file():
        raise SanaCheckpointError(f"text encoder folder {model_folder} has no config.json")
    config = read_json_file(path, "text encoder config")
    if not isinstance(config, dict):
        raise SanaCheckpointError(f"{path}: not a model config (a JSON {type(config).__name__}, not an object)")
    model_type = config.get("model_type")
    if model_type != "gemma2":
        raise SanaCheckpointError(
            f"{path} has model_type {shorten(repr(model_type))}; SANA's text encoder is Gemma-2 ('gemma2')"
        )
    check_config_values(str(path), config, _CONFIG_BOUNDS)
    return config


def _check_weights(model_folder: Path) -> None:
    present = [name for name in WEIGHT_FILES if (model_folder / name).is_file()]
    if not present and not any(model_folder.glob("*.safetensors")):
        raise SanaCheckpointError(
            f"text encoder folder {model_folder} has no weights: expected one of {', '.join(WEIGHT_FILES)} "
            "or *.safetensors shards"
        )
    for index_name in (n for n in present if n.endswith(".index.json")):
        shards = set(read_shard_index(model_folder / index_name).values())
        missing = sorted(s for s in shards if not (model_folder / s).is_file())
        if missing:
            raise SanaCheckpointError(
                f"text encoder folder {model_folder}: {index_name} lists missing shard(s) {', '.join(missing[:10])}"
            )


def _safetensors_weights(model_folder: Path) -> CheckpointReader | None:
    """The folder's safetensors weights, their headers read and checked against the file sizes
    (a truncated file is named here); None for `pytorch_model.bin` weights."""
    if not any(model_folder.glob("*.safetensors")):
        return None
    return open_checkpoint(model_folder)


def _check_config_fits_weights(config: dict, weights: CheckpointReader, model_folder: Path) -> None:
    """A config.json that disagrees with the weights would have transformers build (and allocate)
    a model of the config's size before reporting anything; compare the sizes up front."""
    names = {key.removeprefix("model."): key for key in weights.keys()}
    embed = names.get("embed_tokens.weight")
    expected = (config.get("vocab_size"), config.get("hidden_size"))
    if embed is not None and None not in expected and weights.shape(embed) != expected:
        raise SanaCheckpointError(
            f"{model_folder / 'config.json'} describes a {expected[0]}×{expected[1]} embedding but the weights "
            f"in {model_folder} hold {list(weights.shape(embed))} ({embed})"
        )
    layers = {key.split(".")[1] for key in names if key.startswith("layers.")}
    wanted = config.get("num_hidden_layers")
    if layers and wanted is not None and len(layers) != wanted:
        raise SanaCheckpointError(
            f"{model_folder / 'config.json'} describes {wanted} layers but the weights in {model_folder} hold {len(layers)}"
        )


def _load_tokenizer(tokenizer_folder: Path):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_folder / name).is_file():
            read_json_file(tokenizer_folder / name, "tokenizer file")  # names the damaged file
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    except MemoryError:
        raise
    except Exception as error:  # tokenizers/sentencepiece raise many types for a damaged file
        files = sorted(p.name for p in tokenizer_folder.glob("tokenizer*"))
        raise SanaCheckpointError(
            f"the tokenizer in {tokenizer_folder} ({', '.join(files)}) cannot be loaded: {shorten(str(error))}"
        ) from error


def load_text_encoder(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
) -> TextEncoder:
    """Load a Gemma-2 text encoder and tokenizer from a local folder, offline only.

    `folder` is a Hugging Face Gemma-2 folder (`Gemma2Model`, or `Gemma2ForCausalLM` such as
    gemma-2-2b-it, whose decoder is taken and whose LM head is never built), or a diffusers
    SANA folder with `text_encoder/` and `tokenizer/`. `dtype=None` keeps the stored dtype: the
    one `config.json` names, else the one holding most of the weights (SANA's encoder is meant to
    run in bf16 or fp32). `attn_implementation=None` keeps transformers' default, which is what
    diffusers and NVlabs get; "eager" is the one that applies Gemma-2's attention logit soft-capping.

    Raises `SanaCheckpointError` naming the folder or file and what is wrong: the folder itself,
    the tokenizer files (missing or damaged), `config.json` (missing, damaged, not Gemma-2, not
    matching the weights), the weights (missing, truncated, a missing shard or tensor).
    """
    from transformers import Gemma2Config, Gemma2Model

    folder = Path(folder)
    if not folder.is_dir():
        raise SanaCheckpointError(f"text encoder folder {folder} does not exist")
    model_folder, tokenizer_folder = _resolve_folders(folder)
    if not any((tokenizer_folder / name).is_file() for name in TOKENIZER_FILES):
        raise SanaCheckpointError(
            f"text encoder folder {tokenizer_folder} has no tokenizer: expected {' or '.join(TOKENIZER_FILES)}"
        )
    config_data = _read_config(model_folder)
    _check_weights(model_folder)
    weights = _safetensors_weights(model_folder)
    if weights is not None:
        _check_config_fits_weights(config_data, weights, model_folder)
    tokenizer = _load_tokenizer(tokenizer_folder)  # before the weights: cheaper to fail on

    try:
        config = Gemma2Config.from_pretrained(str(model_folder), local_files_only=True)
    except Exception as error:  # transformers raises several types for a bad config
        raise SanaCheckpointError(f"unreadable text encoder config {model_folder / 'config.json'}: {shorten(str(error))}") from None

    if dtype is None and weights is not None and not (config_data.get("dtype") or config_data.get("torch_dtype")):
        # transformers' "auto" would take the first tensor's dtype, however few weights share it.
        dtype = dominant_float_dtype(weights)
    load_kwargs: dict = {"local_files_only": True, "dtype": dtype if dtype is not None else "auto"}
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    # Gemma2Model strips the CausalLM's "model." prefix itself, so a gemma-2-2b-it folder loads
    # its decoder directly and the (tied, 256k-row) LM head is never materialised.
    try:
        model, info = Gemma2Model.from_pretrained(str(model_folder), config=config, output_loading_info=True, **load_kwargs)
    except MemoryError:
        raise
    except Exception as error:  # safetensors, zip and torch errors for a damaged weights file
        raise SanaCheckpointError(f"the text encoder weights in {model_folder} cannot be loaded: {shorten(str(error))}") from error
    missing = sorted(info.get("missing_keys", []))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise SanaCheckpointError(f"text encoder weights in {model_folder} lack {len(missing)} tensor(s): {shown}")
    model = model.to(device).eval().requires_grad_(False)
    return TextEncoder(model=model, tokenizer=tokenizer, folder=folder)


__all__ = [
    "COMPLEX_HUMAN_INSTRUCTION",
    "COMPLEX_HUMAN_INSTRUCTION_NVLABS",
    "DEFAULT_MAX_LENGTH",
    "TextEncoder",
    "chi_text",
    "load_text_encoder",
]
