"""The single-file Gemma-2 ComfyUI users have for Lumina Image 2.0 (`gemma_2_2b_fp16.safetensors`).

The file is written in ComfyUI's exact form by `tests/tiny_gemma.py` (every decoder weight under
`model.`, the SentencePiece model as the 1-D uint8 tensor `spiece_model`, one safetensors file),
beside a Hugging Face folder of the same weights and tokenizer (tokenizer.model and the
tokenizer.json transformers converts it to). Loaded by `sana.load_text_encoder`, both forms run
the same transformers `Gemma2Model` class on the same config values, the same weights bit for
bit and the same token ids, so their encodings are compared with `torch.equal`.
With COMFYUI_DIR set, a real ComfyUI also reads the file: its own detection and tokenizer, and
the Gemma Loader node listing it (beside the folder) and loading it as `sana.load_text_encoder` does.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sana.checkpoint
from sana.errors import SanaCheckpointError, SanaInputError
from sana.text_encoder import COMPLEX_HUMAN_INSTRUCTION, COMPLEX_HUMAN_INSTRUCTION_NVLABS, load_text_encoder
from tiny_gemma import SAMPLE_PROMPTS, build_spiece_gemma, comfy_gemma_tensors, train_spiece_model, write_comfy_gemma_file

FILE_NAME = "gemma_2_2b_fp16.safetensors"
TEXTS = [
    *SAMPLE_PROMPTS,
    *(p.lower() for p in SAMPLE_PROMPTS),
    "\n".join(COMPLEX_HUMAN_INSTRUCTION) + "a cat sleeping",
    "\n".join(COMPLEX_HUMAN_INSTRUCTION_NVLABS) + "zebra quartz xylophone",
    "  two  spaces,\ttabs\nand a newline  ",
    "émoji 🙂, ünïcode and digits 1234567890",
    "",
]
# The config values that decide the computation; the file's come from its shapes and Gemma-2-2B.
CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "rms_norm_eps", "rope_parameters", "query_pre_attn_scalar",
    "sliding_window", "layer_types", "attn_logit_softcapping", "final_logit_softcapping", "attention_bias",
    "max_position_embeddings", "pad_token_id", "bos_token_id", "_attn_implementation",
)


@pytest.fixture(scope="module")
def spiece() -> bytes:
    return train_spiece_model()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, spiece) -> Path:
    """A tiny gemma-2-2b-it: a causal LM folder, as the Lumina file was made from one."""
    return build_spiece_gemma(tmp_path_factory.mktemp("text_encoders") / "gemma-2-2b-it", spiece, causal_lm=True, num_hidden_layers=3)


@pytest.fixture(scope="module")
def file_fp32(folder, tmp_path_factory) -> Path:
    return write_comfy_gemma_file(folder, tmp_path_factory.mktemp("file") / "gemma_2_2b_fp32.safetensors", dtype=torch.float32)


@pytest.fixture(scope="module")
def from_folder(folder):
    return load_text_encoder(folder)


@pytest.fixture(scope="module")
def from_file(file_fp32):
    return load_text_encoder(file_fp32)


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _write(tensors: dict, path: Path) -> Path:
    save_file(tensors, str(path))
    return path


# --------------------------------------------------------------------------------------------
# The file's form


def test_written_file_has_comfyui_gemma2_form(folder, tmp_path, spiece):
    """What the loader is tested on is what ComfyUI's `detect_te_model` calls GEMMA_2_2B."""
    from transformers import Gemma2Model

    path = write_comfy_gemma_file(folder, tmp_path / FILE_NAME)
    header = _header(path)
    header.pop("__metadata__", None)
    decoder = Gemma2Model.from_pretrained(str(folder)).state_dict()
    assert set(header) == {f"model.{k}" for k in decoder} | {"spiece_model"}
    assert "model.layers.0.post_feedforward_layernorm.weight" in header
    assert not any("q_norm" in k for k in header)  # ComfyUI would call it Gemma-3
    assert {v["dtype"] for k, v in header.items() if k != "spiece_model"} == {"F16"}
    assert header["spiece_model"]["dtype"] == "U8" and header["spiece_model"]["shape"] == [len(spiece)]
    assert comfy_gemma_tensors(folder)["spiece_model"].numpy().tobytes() == spiece


# --------------------------------------------------------------------------------------------
# Parity with the folder form


def test_file_config_equals_folder_config(from_folder, from_file):
    ours, theirs = from_file.model.config.to_dict(), from_folder.model.config.to_dict()
    assert {k: ours.get(k) for k in CONFIG_KEYS} == {k: theirs.get(k) for k in CONFIG_KEYS}
    assert ours["num_hidden_layers"] == 3 and ours["num_attention_heads"] == 2 and ours["head_dim"] == 16


def test_file_tokenizer_gives_the_folder_tokenizer_ids(from_folder, from_file):
    for text in TEXTS:
        assert from_file.tokenizer.encode(text) == from_folder.tokenizer.encode(text), text
    kwargs = dict(padding="max_length", max_length=64, truncation=True, add_special_tokens=True, padding_side="right", return_tensors="pt")
    ours, theirs = from_file.tokenizer(TEXTS, **kwargs), from_folder.tokenizer(TEXTS, **kwargs)
    assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.attention_mask, theirs.attention_mask)
    assert ours.attention_mask[:, -1].any() and not ours.attention_mask.all()  # both truncated and padded rows
    chi = from_file.tokenizer.encode("\n".join(COMPLEX_HUMAN_INSTRUCTION))
    assert chi[0] == 2 and from_file.tokenizer.unk_token_id not in chi and 100 < len(chi)  # <bos>, then sub-words


@pytest.mark.parametrize("chi", [True, COMPLEX_HUMAN_INSTRUCTION_NVLABS, False])
@pytest.mark.parametrize("max_length", [300, 24])
def test_file_encodings_equal_folder_encodings(from_folder, from_file, chi, max_length):
    prompts = ["A Painting of a Squirrel eating a Burger.  ", "a cute robot holding a red balloon", ""]
    expected, expected_mask = from_folder.encode(prompts, chi=chi, max_length=max_length)
    embeds, mask = from_file.encode(prompts, chi=chi, max_length=max_length)
    assert embeds.dtype == torch.float32 and embeds.std() > 0.1
    assert torch.equal(embeds, expected) and torch.equal(mask, expected_mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_file_cast_on_load_equals_folder_cast_on_load(folder, file_fp32, dtype):
    """Both forms cast the same fp32 weights once, with the same rounding, and run the same code."""
    expected, _ = load_text_encoder(folder, dtype=dtype).encode(["a cat sleeping"], max_length=16)
    embeds, _ = load_text_encoder(file_fp32, dtype=dtype).encode(["a cat sleeping"], max_length=16)
    assert embeds.dtype == dtype and torch.equal(embeds, expected)


def test_eager_attention_is_honoured(folder, file_fp32):
    expected, _ = load_text_encoder(folder, attn_implementation="eager").encode(["a cat"], max_length=16)
    encoder = load_text_encoder(file_fp32, attn_implementation="eager")
    assert encoder.model.config._attn_implementation == "eager"
    assert torch.equal(encoder.encode(["a cat"], max_length=16)[0], expected)


def test_bare_decoder_names_load_too_and_an_lm_head_is_ignored(folder, from_folder, tmp_path):
    tensors = {k.removeprefix("model."): v for k, v in comfy_gemma_tensors(folder, dtype=torch.float32).items()}
    tensors["lm_head.weight"] = torch.randn_like(tensors["embed_tokens.weight"])  # a causal-LM export may add it
    encoder = load_text_encoder(_write(tensors, tmp_path / "bare.safetensors"))
    assert torch.equal(encoder.encode(["a cat"], max_length=16)[0], from_folder.encode(["a cat"], max_length=16)[0])


# --------------------------------------------------------------------------------------------
# dtype and streaming


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_file_keeps_its_dtype(folder, tmp_path, dtype):
    encoder = load_text_encoder(write_comfy_gemma_file(folder, tmp_path / "g.safetensors", dtype=dtype))
    assert {p.dtype for p in encoder.model.parameters()} == {dtype}
    assert encoder.encode(["a cat"], max_length=8)[0].dtype == dtype
    assert load_text_encoder(tmp_path / "g.safetensors", dtype=torch.float32).dtype == torch.float32


def test_mixed_dtype_file_takes_its_dominant_dtype(folder, tmp_path):
    tensors = comfy_gemma_tensors(folder, dtype=torch.float16)
    for key in [k for k in tensors if k.endswith("norm.weight")]:
        tensors[key] = tensors[key].float()  # the norms (few elements) in fp32, the rest in fp16
    encoder = load_text_encoder(_write(tensors, tmp_path / "mixed.safetensors"))
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float16}


def test_each_tensor_is_read_once(file_fp32, monkeypatch):
    """Weights are streamed from the file into the model: one read per tensor, no second pass."""
    reads: list[str] = []
    read = sana.checkpoint._SafetensorsFile.read
    monkeypatch.setattr(sana.checkpoint._SafetensorsFile, "read", lambda self, name: reads.append(name) or read(self, name))
    load_text_encoder(file_fp32)
    assert sorted(reads) == sorted(_header(file_fp32).keys() - {"__metadata__"})


def test_model_is_built_without_parameter_memory(file_fp32, monkeypatch):
    """The 2B file is 5 GB: the model is built with its parameters on the meta device (its computed
    buffers real) and the streamed tensors become the parameters, so there is one copy."""
    import sana.text_encoder as text_encoder

    built = {}
    assign = text_encoder.assign_state

    def spy(module, tensors, **kwargs):
        built["parameters on meta"] = all(p.is_meta for p in module.parameters())
        built["buffers real"] = all(not b.is_meta for b in module.buffers())
        return assign(module, tensors, **kwargs)

    monkeypatch.setattr(text_encoder, "assign_state", spy)
    encoder = load_text_encoder(file_fp32)
    assert built == {"parameters on meta": True, "buffers real": True}
    assert not any(p.is_meta for p in encoder.model.parameters())


# --------------------------------------------------------------------------------------------
# Files that cannot be used: named, before any weight is read


def _refused(path: Path, match: str, monkeypatch) -> str:
    reads: list[str] = []
    read = sana.checkpoint._SafetensorsFile.read
    monkeypatch.setattr(sana.checkpoint._SafetensorsFile, "read", lambda self, name: reads.append(name) or read(self, name))
    with pytest.raises(SanaCheckpointError, match=match) as error:
        load_text_encoder(path)
    assert str(path) in str(error.value) and len(str(error.value)) < 1200
    assert set(reads) <= {"spiece_model"}, reads
    return str(error.value)


def _edited(folder: Path, tmp_path: Path, edit) -> Path:
    tensors = comfy_gemma_tensors(folder, dtype=torch.float32)
    edit(tensors)
    return _write(tensors, tmp_path / "edited.safetensors")


def test_file_without_spiece_model_is_refused(folder, tmp_path, monkeypatch):
    path = _edited(folder, tmp_path, lambda t: t.pop("spiece_model"))
    _refused(path, r"no 'spiece_model' tensor, so no tokenizer", monkeypatch)


@pytest.mark.parametrize("bad", ["float", "2-D", "garbage", "empty"])
def test_damaged_spiece_model_is_refused(folder, tmp_path, monkeypatch, bad):
    spiece = comfy_gemma_tensors(folder)["spiece_model"]
    replacement = {
        "float": spiece.float(),
        "2-D": spiece[: spiece.numel() // 2 * 2].reshape(2, -1),
        "garbage": torch.frombuffer(bytearray(b"not a sentencepiece model"), dtype=torch.uint8),
        "empty": torch.zeros(0, dtype=torch.uint8),
    }[bad]
    path = _edited(folder, tmp_path, lambda t: t.update(spiece_model=replacement))
    match = {"float": "expected the bytes", "2-D": "expected the bytes", "garbage": "not a SentencePiece model", "empty": "empty SentencePiece model"}[bad]
    _refused(path, match, monkeypatch)


def test_missing_layer_is_named(folder, tmp_path, monkeypatch):
    path = _edited(folder, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")])
    message = _refused(path, r"missing keys \(11\): \['model\.layers\.1\.", monkeypatch)
    assert "'model.layers.1.mlp.down_proj.weight'" in message and "and 1 more" in message


def test_missing_tensor_is_named(folder, tmp_path, monkeypatch):
    path = _edited(folder, tmp_path, lambda t: t.pop("model.layers.2.post_feedforward_layernorm.weight"))
    _refused(path, r"missing keys \(1\): \['model\.layers\.2\.post_feedforward_layernorm\.weight'\]", monkeypatch)


def test_inconsistent_shape_is_named(folder, tmp_path, monkeypatch):
    path = _edited(folder, tmp_path, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    _refused(path, r"wrong shapes \(1\): \['model\.layers\.1\.self_attn\.k_proj\.weight: expected \[16, 32\], found \[32, 32\]", monkeypatch)


def test_heads_that_cannot_be_worked_out_are_named(folder, tmp_path, monkeypatch):
    path = _edited(folder, tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(24, 32)}))
    _refused(path, r"cannot work out the attention heads from model\.layers\.0\.self_attn\.q_proj\.weight \[24, 32\]", monkeypatch)


def test_tokenizer_larger_than_the_embedding_is_refused(folder, tmp_path, monkeypatch):
    path = _edited(folder, tmp_path, lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:100]}))
    _refused(path, r"'spiece_model' has 700 pieces but model\.embed_tokens\.weight only 100 rows", monkeypatch)


def test_gemma3_file_is_refused(folder, tmp_path, monkeypatch):
    path = _edited(folder, tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.zeros(16)}))
    _refused(path, "has q_norm weights, so it holds a Gemma-3", monkeypatch)


def test_unusable_dtype_and_attention_are_named(file_fp32):
    with pytest.raises(SanaInputError, match="text encoder dtype torch.int8 is not one of"):
        load_text_encoder(file_fp32, dtype=torch.int8)
    with pytest.raises(SanaInputError, match="attn_implementation='no-such-kernel'"):
        load_text_encoder(file_fp32, attn_implementation="no-such-kernel")


def test_other_text_encoder_file_is_refused(tmp_path, monkeypatch):
    path = _write({f"text_model.encoder.layers.{i}.mlp.fc1.weight": torch.zeros(2, 2) for i in range(50)}, tmp_path / "clip_l.safetensors")
    message = _refused(path, r"not a Gemma-2 text encoder \(no model\.embed_tokens\.weight; it holds", monkeypatch)
    assert "and 40 more" in message  # the key list is cut short


def test_absurd_layer_index_is_refused_before_building(folder, tmp_path, monkeypatch):
    path = _edited(folder, tmp_path, lambda t: t.update({"model.layers.99999.input_layernorm.weight": torch.zeros(32)}))
    _refused(path, r"sizes read from its weights.*num_hidden_layers=100000", monkeypatch)


# --------------------------------------------------------------------------------------------
# A real ComfyUI reads the same file, and the Gemma Loader node lists and loads it

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
ROOT = Path(__file__).resolve().parents[1]

COMFY_SCRIPT = textwrap.dedent(
    r'''
    import importlib.util, json, sys
    comfy_dir, root, models, texts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_dir)
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch, folder_paths, comfy.sd, comfy.utils
    from comfy.text_encoders.spiece_tokenizer import SPieceTokenizer
    folder_paths.add_model_folder_path("text_encoders", f"{models}/text_encoders", is_default=True)
    spec = importlib.util.spec_from_file_location("sana_comfy_gemma", f"{root}/__init__.py", submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module; spec.loader.exec_module(module)
    from sana_comfy_gemma.nodes import comfy_nodes as cn, specs
    from sana_comfy_gemma.sana import load_text_encoder

    path = f"{models}/text_encoders/gemma_2_2b_fp16.safetensors"
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    tokenizer = SPieceTokenizer(sd["spiece_model"], add_bos=True, add_eos=False)  # as lumina2.Gemma2BTokenizer
    result = {"detected": comfy.sd.detect_te_model(sd).name, "ids": [tokenizer(t)["input_ids"] for t in texts],
              "listed": cn.DYNAMIC_OPTIONS[specs.GEMMA_FOLDERS]()}
    with torch.inference_mode():
        (gemma,) = cn.run_gemma_loader("gemma_2_2b_fp16.safetensors", "fp32")
        [[embeds, extras]] = cn.run_text_encode(gemma, "a red bicycle", "preset", "", 300)[0]
        expected, expected_mask = load_text_encoder(path, dtype=torch.float32).encode(["a red bicycle"])
    result["equal"] = bool(torch.equal(embeds, expected) and torch.equal(extras["attention_mask"], expected_mask))
    result["std"] = float(embeds.std())
    print("RESULT " + json.dumps(result))
    '''
)


@pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR (and COMFYUI_PYTHON) to run against a real ComfyUI")
def test_comfyui_reads_the_file_and_the_node_loads_it(spiece, tmp_path, from_file):
    text_encoders = tmp_path / "text_encoders"
    folder = build_spiece_gemma(text_encoders / "gemma-2-2b-it", spiece, causal_lm=True)
    write_comfy_gemma_file(folder, text_encoders / FILE_NAME)
    (text_encoders / "notes.txt").write_text("not a model")
    script = tmp_path / "comfy_gemma.py"
    script.write_text(COMFY_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_DIR, str(ROOT), str(tmp_path), json.dumps(TEXTS)],
                         cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=600, env=env)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert run.returncode == 0 and line, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(line[len("RESULT "):])
    assert result["detected"] == "GEMMA_2_2B"
    assert result["ids"] == [from_file.tokenizer.encode(t) for t in TEXTS]  # ComfyUI's own tokenizer of the file
    assert result["listed"] == ["gemma-2-2b-it", FILE_NAME]
    assert result["equal"] and result["std"] > 0.1


def test_a_read_failing_mid_load_names_the_file(file_fp32, monkeypatch):
    """A disk error or a truncated file while the weights stream in is a SanaCheckpointError
    naming the file, not a bare OSError/RuntimeError from deep inside the load."""
    from test_io_safety import failing_reads

    failing_reads(monkeypatch)
    with pytest.raises(SanaCheckpointError, match=rf"{re.escape(str(file_fp32))}: failed while reading tensor data: "):
        load_text_encoder(file_fp32)
