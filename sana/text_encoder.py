"""Gemma-2 text conditioning for SANA, with the complex human instruction (CHI).

`load_text_encoder(path)` loads a Gemma-2 decoder and its tokenizer, offline only, from a
Hugging Face folder or from the single file ComfyUI users keep for Lumina Image 2.0
(`gemma_2_2b_fp16.safetensors`: the decoder's weights under `model.` plus its SentencePiece
model as the uint8 tensor `spiece_model`, no config; the sizes are read from the weights, the
rest is Gemma-2-2B's). `TextEncoder.encode` turns prompts into the [B, max_length, hidden]
states and [B, max_length] mask the DiT cross-attends to, exactly as diffusers' `SanaPipeline`
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

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointReader,
    assign_state,
    check_config_values,
    check_keys,
    dominant_float_dtype,
    open_checkpoint,
    preview,
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

# The single-file form (ComfyUI's Gemma-2-2B for Lumina Image 2.0): the tokenizer's key, and the
# key a causal-LM export may add that the decoder does not use (Gemma ties it to the embedding).
SPIECE_KEY = "spiece_model"
IGNORED_FILE_KEYS = frozenset({SPIECE_KEY, "lm_head.weight"})
# google/gemma-2-2b's config.json less what the weights tell (sizes) and the tokenizer tells
# (special token ids); ComfyUI hard-codes the same values for this file.
GEMMA2_2B_SETTINGS: dict = {
    "model_type": "gemma2",
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
}
# Shapes give heads × head width, not each: Gemma-2 2B and 9B use 256-wide heads. A key/value
# projection narrower than that is read as one key-value head (the tiny test models).
GEMMA2_HEAD_DIM = 256
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


class SentencePieceTokenizer:
    """Gemma's SentencePiece model run by `sentencepiece` itself (as ComfyUI runs the single-file
    form's `spiece_model`), behind the part of a transformers tokenizer `TextEncoder.encode`
    uses: BOS first, no EOS, `<pad>` for padding. Gemma's `tokenizer.json` is the conversion of
    this same model, so a folder's tokenizer and this one give the same ids."""

    def __init__(self, processor, source: str):
        self._processor = processor
        if processor.get_piece_size() == 0:
            raise SanaCheckpointError(f"{source}: an empty SentencePiece model")
        self.bos_token_id = processor.bos_id()
        self.eos_token_id = processor.eos_id()
        self.pad_token_id = processor.pad_id()
        self.unk_token_id = processor.unk_id()
        if self.bos_token_id < 0 or self.pad_token_id < 0:
            raise SanaCheckpointError(f"{source}: the SentencePiece model defines no <bos> or no <pad> piece, which Gemma's has")

    def __len__(self) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._processor.encode(text)
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = False,
        add_special_tokens: bool = True,
        padding_side: str = "right",
        return_tensors: str | None = None,
    ):
        """`input_ids` and `attention_mask` for `texts`, as a transformers tokenizer returns them:
        truncated to `max_length` (BOS counted), padded to the longest row (`padding=True` or
        "longest") or to `max_length` ("max_length") on `padding_side`."""
        from transformers import BatchEncoding

        rows = [self.encode(t, add_special_tokens) for t in ([texts] if isinstance(texts, str) else texts)]
        if truncation and max_length is not None:
            rows = [row[:max_length] for row in rows]
        if padding == "max_length" and max_length is not None:
            width = max_length
        else:
            width = max(map(len, rows), default=0) if padding else 0
        ids, mask = [], []
        for row in rows:
            fill = max(width - len(row), 0)
            pads, masked = [self.pad_token_id] * fill, [0] * fill
            ids.append(pads + row if padding_side == "left" else row + pads)
            mask.append(masked + [1] * len(row) if padding_side == "left" else [1] * len(row) + masked)
        single = isinstance(texts, str)
        if single:
            ids, mask = ids[0], mask[0]
        return BatchEncoding({"input_ids": ids, "attention_mask": mask}, tensor_type=return_tensors, prepend_batch_axis=single)


@dataclass
class TextEncoder:
    """A loaded Gemma-2 decoder and its tokenizer. Build with `load_text_encoder`.

    `folder` is what it was loaded from: a folder, or the single file."""

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


def _spiece_tokenizer(reader: CheckpointReader) -> SentencePieceTokenizer:
    """The tokenizer a single-file Gemma carries as the bytes of a SentencePiece model."""
    path = reader.path
    if SPIECE_KEY not in reader:
        raise SanaCheckpointError(
            f"{path}: no {SPIECE_KEY!r} tensor, so no tokenizer (a single-file Gemma-2 carries its SentencePiece "
            "model under that key, as ComfyUI's gemma_2_2b_fp16.safetensors does); use a Hugging Face Gemma-2 folder instead"
        )
    info = reader.infos[SPIECE_KEY]
    if info.dtype != torch.uint8 or len(info.shape) != 1:
        raise SanaCheckpointError(
            f"{path}: {SPIECE_KEY!r} is a {info.dtype} tensor of shape {list(info.shape)}; expected the bytes of a "
            "SentencePiece model (a 1-D uint8 tensor)"
        )
    try:
        import sentencepiece
    except ImportError:
        raise SanaCheckpointError(f"{path}: its tokenizer ({SPIECE_KEY!r}) needs the sentencepiece package (pip install sentencepiece)") from None
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=reader.read(SPIECE_KEY).numpy().tobytes())
    except (RuntimeError, ValueError, TypeError) as error:
        raise SanaCheckpointError(f"{path}: {SPIECE_KEY!r} is not a SentencePiece model: {shorten(str(error))}") from None
    return SentencePieceTokenizer(processor, f"{path} ({SPIECE_KEY!r})")


def _decoder_prefix(reader: CheckpointReader) -> str:
    """"model." for ComfyUI's layout (a causal LM's names), "" for a bare decoder's."""
    path = reader.path
    if any(key.endswith("self_attn.q_norm.weight") for key in reader.keys()):
        raise SanaCheckpointError(
            f"{path} has q_norm weights, so it holds a Gemma-3 (or another newer model); SANA's text encoder is Gemma-2"
        )
    for prefix in ("model.", ""):
        if f"{prefix}embed_tokens.weight" in reader:
            return prefix
    tensors = sorted(k for k in reader.keys() if k not in IGNORED_FILE_KEYS)
    raise SanaCheckpointError(f"{path}: not a Gemma-2 text encoder (no model.embed_tokens.weight; it holds {preview(tensors)})")


def _shape(reader: CheckpointReader, key: str) -> tuple[int, int]:
    if key not in reader:
        raise SanaCheckpointError(f"{reader.path}: lacks {key}")
    shape = reader.shape(key)
    if len(shape) != 2 or 0 in shape:
        raise SanaCheckpointError(f"{reader.path}: {key} has shape {list(shape)}; expected a non-empty matrix")
    return shape


def _config_from_weights(reader: CheckpointReader, prefix: str, tokenizer: SentencePieceTokenizer) -> dict:
    """A Gemma-2 config.json for a file that carries none: the sizes from the weights' shapes, the
    special token ids from the tokenizer, everything else Gemma-2-2B's."""
    path = reader.path
    vocab, hidden = _shape(reader, f"{prefix}embed_tokens.weight")
    q_key, kv_key = f"{prefix}layers.0.self_attn.q_proj.weight", f"{prefix}layers.0.self_attn.k_proj.weight"
    q_width, kv_width = _shape(reader, q_key)[0], _shape(reader, kv_key)[0]
    intermediate = _shape(reader, f"{prefix}layers.0.mlp.gate_proj.weight")[0]
    indices = {key[len(prefix):].split(".")[1] for key in reader.keys() if key.startswith(f"{prefix}layers.")}
    layers = 1 + max(int(i) for i in indices if i.isdigit())
    head_dim = min(GEMMA2_HEAD_DIM, kv_width)
    if q_width % head_dim or kv_width % head_dim or (q_width // head_dim) % (kv_width // head_dim):
        raise SanaCheckpointError(
            f"{path}: cannot work out the attention heads from {q_key} {[q_width, hidden]} and {kv_key} {[kv_width, hidden]} "
            f"(Gemma-2's heads are {GEMMA2_HEAD_DIM} wide, or one key-value head when the key projection is narrower)"
        )
    if len(tokenizer) > vocab:
        raise SanaCheckpointError(
            f"{path}: {SPIECE_KEY!r} has {len(tokenizer)} pieces but {prefix}embed_tokens.weight only {vocab} rows"
        )
    config = {
        **GEMMA2_2B_SETTINGS,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": q_width // head_dim,
        "num_key_value_heads": kv_width // head_dim,
        "head_dim": head_dim,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    check_config_values(f"{path} (sizes read from its weights)", config, _CONFIG_BOUNDS)
    return config


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init) and their
    buffers for real: Gemma-2's rotary frequencies and embedding scale are computed in `__init__`
    and never stored, so a model built wholly on meta would lose them. The patch is process-wide
    for as long as the (millisecond) build takes."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build in `dtype` as transformers' `from_pretrained` does, so buffers made from Python numbers
    (the embedding scale) are rounded once, to the same value as in a folder-loaded model."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _load_single_file(path: Path, dtype: torch.dtype | None, device: torch.device | str, attn_implementation: str | None) -> TextEncoder:
    """A Gemma-2 from one file holding the decoder's weights and the `spiece_model` tokenizer.

    Everything is checked from the header (and the tokenizer bytes) before a weight is read; the
    weights are then streamed one tensor at a time into a model built without parameter memory.
    """
    from transformers import Gemma2Config, Gemma2Model

    reader = open_checkpoint(path)
    prefix = _decoder_prefix(reader)
    tokenizer = _spiece_tokenizer(reader)
    config_data = _config_from_weights(reader, prefix, tokenizer)
    weight_keys = [k for k in reader.keys() if k not in IGNORED_FILE_KEYS]
    if dtype is None:
        dtype = dominant_float_dtype(reader, weight_keys)
        if dtype not in MODEL_DTYPES:
            raise SanaCheckpointError(f"{path}: its weights are mostly {dtype}; pass dtype=torch.bfloat16 or torch.float32")
    elif dtype not in MODEL_DTYPES:
        raise SanaInputError(f"text encoder dtype {dtype} is not one of {', '.join(map(str, MODEL_DTYPES))}")
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    config = Gemma2Config.from_dict(config_data, **extra)
    try:
        with _default_dtype(dtype), _parameters_on_meta():
            model = Gemma2Model(config)
    except ValueError as error:  # transformers' refusal of an attention implementation
        if attn_implementation is None:
            raise
        raise SanaInputError(f"attn_implementation={attn_implementation!r}: {shorten(str(error))}") from None
    expected = {prefix + name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    check_keys(path, expected, {k: reader.shape(k) for k in weight_keys})
    tensors = ((name[len(prefix):], reader.read(name)) for name in expected)
    model = assign_state(model, tensors, dtype=dtype, device=device, source=path)
    return TextEncoder(model=model.eval().requires_grad_(False), tokenizer=tokenizer, folder=path)


def load_text_encoder(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
) -> TextEncoder:
    """Load a Gemma-2 text encoder and tokenizer from a local folder or file, offline only.

    `folder` is a Hugging Face Gemma-2 folder (`Gemma2Model`, or `Gemma2ForCausalLM` such as
    gemma-2-2b-it, whose decoder is taken and whose LM head is never built), a diffusers SANA
    folder with `text_encoder/` and `tokenizer/`, or a single file as ComfyUI keeps Gemma-2-2B
    (`gemma_2_2b_fp16.safetensors`: the decoder's weights, under `model.` or bare, and its
    SentencePiece model as the uint8 tensor `spiece_model`). A file has no config: vocabulary,
    width, layers and MLP width come from the weights' shapes, the heads from Gemma-2's 256-wide
    heads (one key-value head when the key projection is narrower, as in tiny test models), the
    rest from Gemma-2-2B; its tokenizer is run by `sentencepiece` and gives the same ids as a
    folder's tokenizer of the same model.

    `dtype=None` keeps the stored dtype: the one `config.json` names, else the one holding most of
    the weights (SANA's encoder is meant to run in bf16 or fp32; Gemma-2 can overflow in fp16).
    `attn_implementation=None` keeps transformers' default, which is what diffusers and NVlabs
    get; "eager" is the one that applies Gemma-2's attention logit soft-capping.

    Raises `SanaCheckpointError` naming the folder or file and what is wrong: the folder itself,
    the tokenizer files (missing or damaged), `config.json` (missing, damaged, not Gemma-2, not
    matching the weights), the weights (missing, truncated, a missing shard or tensor); for a
    file, a missing or damaged `spiece_model`, missing layers or tensors, shapes that disagree.
    """
    from transformers import Gemma2Config, Gemma2Model

    folder = Path(folder)
    if folder.is_file():
        return _load_single_file(folder, dtype, device, attn_implementation)
    if not folder.is_dir():
        raise SanaCheckpointError(f"text encoder {folder} does not exist (expected a Gemma-2 folder or single file)")
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
