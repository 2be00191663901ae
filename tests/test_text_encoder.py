"""Gemma-2 text conditioning against diffusers' SanaPipeline.encode_prompt, exactly (fp32).

The encoder is a tiny random Gemma-2 (eager attention) with a BPE tokenizer trained offline
on a corpus that covers the CHI, built by `tests/tiny_gemma.py`.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, SanaPAGPipeline, SanaPipeline, SanaSprintPipeline
from transformers import AutoTokenizer, Gemma2ForCausalLM, Gemma2Model

from sana.errors import SanaCheckpointError
from sana.text_encoder import (
    COMPLEX_HUMAN_INSTRUCTION,
    COMPLEX_HUMAN_INSTRUCTION_NVLABS,
    chi_text,
    load_text_encoder,
)
from tiny_gemma import build_tiny_gemma

LONG_PROMPT = " ".join(["A bustling city street scene at dusk with glowing street lamps."] * 40)
PROMPTS = {
    "short": ["A Painting of a Squirrel eating a Burger.  "],
    "batch": ["a cute robot holding a red balloon", "Sunset over the ocean; pink and orange clouds, calm water."],
    "long": [LONG_PROMPT, "A cat sleeping"],
    "empty": [""],
}


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma"))


@pytest.fixture(scope="module")
def encoder(gemma_folder):
    return load_text_encoder(gemma_folder, attn_implementation="eager")


@pytest.fixture(scope="module")
def reference(gemma_folder) -> SanaPipeline:
    """diffusers' pipeline around an independently loaded copy of the same folder."""
    tokenizer = AutoTokenizer.from_pretrained(str(gemma_folder), local_files_only=True)
    text_encoder = Gemma2Model.from_pretrained(str(gemma_folder), local_files_only=True, attn_implementation="eager")
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=None,
        transformer=None,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _reference_encode(pipe: SanaPipeline, prompts, chi, max_length):
    with torch.no_grad():
        return pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=True,
            negative_prompt="",
            device=torch.device("cpu"),
            max_sequence_length=max_length,
            complex_human_instruction=None if chi is False else list(chi),
        )


def test_fixture_tokenizer_covers_the_chi(encoder):
    tokenizer = encoder.tokenizer
    for chi in (COMPLEX_HUMAN_INSTRUCTION, COMPLEX_HUMAN_INSTRUCTION_NVLABS):
        ids = tokenizer.encode("\n".join(chi))
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert 100 < len(ids) < len("\n".join(chi))  # sub-word tokens, not characters
    single = tokenizer.encode(chi_text(COMPLEX_HUMAN_INSTRUCTION))
    double = tokenizer.encode(chi_text(COMPLEX_HUMAN_INSTRUCTION_NVLABS))
    assert single != double


def test_default_chi_is_diffusers_text():
    for pipeline in (SanaPipeline, SanaSprintPipeline, SanaPAGPipeline):
        default = inspect.signature(pipeline.__call__).parameters["complex_human_instruction"].default
        assert default == list(COMPLEX_HUMAN_INSTRUCTION), pipeline.__name__
    assert chi_text(True) == "\n".join(COMPLEX_HUMAN_INSTRUCTION)
    # NVlabs' text differs only by the quotes around Enhanced prompt.
    assert chi_text(COMPLEX_HUMAN_INSTRUCTION_NVLABS) == chi_text(True).replace("'Enhanced prompt'", '"Enhanced prompt"')


@pytest.mark.parametrize("case", sorted(PROMPTS))
@pytest.mark.parametrize("chi", ["diffusers", "nvlabs", "none"])
@pytest.mark.parametrize("max_length", [300, 24])
def test_encode_equals_diffusers_encode_prompt(encoder, reference, case, chi, max_length):
    prompts = PROMPTS[case]
    chi_lines = {"diffusers": COMPLEX_HUMAN_INSTRUCTION, "nvlabs": COMPLEX_HUMAN_INSTRUCTION_NVLABS, "none": False}[chi]
    expected, expected_mask, expected_neg, expected_neg_mask = _reference_encode(reference, prompts, chi_lines, max_length)

    chi_arg = {"diffusers": True, "nvlabs": COMPLEX_HUMAN_INSTRUCTION_NVLABS, "none": False}[chi]
    embeds, mask = encoder.encode(prompts, chi=chi_arg, max_length=max_length)
    assert embeds.shape == (len(prompts), max_length, encoder.hidden_size)
    assert embeds.dtype == torch.float32
    assert torch.equal(embeds, expected)
    assert torch.equal(mask, expected_mask)

    negative, negative_mask = encoder.encode([""] * len(prompts), chi=False, max_length=max_length)
    assert torch.equal(negative, expected_neg)
    assert torch.equal(negative_mask, expected_neg_mask)


def test_long_prompt_is_truncated_on_the_right(encoder):
    embeds, mask = encoder.encode(PROMPTS["long"], max_length=300)
    assert mask[0].all()  # the long prompt fills every kept position
    assert mask[1].sum() < 20  # the short one is right-padded
    assert embeds.shape == (2, 300, encoder.hidden_size)


def test_lowercase_false_matches_diffusers_with_strip_only_preprocessing(encoder, reference, monkeypatch):
    """NVlabs only strips prompts; diffusers lowercases them. `lowercase=False` must equal the
    diffusers computation with its preprocessing replaced by strip()."""
    prompts = ["  A Painting of a Squirrel, NOT lowercase  "]
    monkeypatch.setattr(reference, "_text_preprocessing", lambda text, clean_caption=False: [t.strip() for t in text])
    expected, expected_mask, _, _ = _reference_encode(reference, prompts, COMPLEX_HUMAN_INSTRUCTION, 40)
    embeds, mask = encoder.encode(prompts, max_length=40, lowercase=False)
    assert torch.equal(embeds, expected) and torch.equal(mask, expected_mask)
    lowered, _ = encoder.encode(prompts, max_length=40)
    assert not torch.equal(lowered, embeds)


def test_causal_lm_folder_loads_its_decoder(tmp_path):
    folder = build_tiny_gemma(tmp_path / "causal", causal_lm=True, seed=3)
    encoder = load_text_encoder(folder)
    decoder = Gemma2ForCausalLM.from_pretrained(str(folder), local_files_only=True).get_decoder().eval()
    ids = encoder.tokenizer(["a cat sleeping"], return_tensors="pt")
    with torch.no_grad():
        expected = decoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
        ours = encoder.model(ids.input_ids, attention_mask=ids.attention_mask)[0]
    assert torch.equal(ours, expected)


def test_diffusers_pipeline_layout_and_dtype(gemma_folder, encoder, tmp_path):
    root = tmp_path / "sana_diffusers"
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    for path in gemma_folder.iterdir():
        target = "tokenizer" if path.name.startswith(("tokenizer", "special_tokens")) else "text_encoder"
        shutil.copy(path, root / target / path.name)
    loaded = load_text_encoder(root, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    embeds, _ = loaded.encode(["a cat"], max_length=16)
    assert embeds.dtype == torch.bfloat16
    expected, _ = encoder.encode(["a cat"], max_length=16)
    assert not torch.equal(embeds.float(), expected)  # really ran in bf16 ...
    torch.testing.assert_close(embeds.float(), expected, atol=0.1, rtol=0.05)  # ... on the same weights


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(SanaCheckpointError, match="nowhere.*does not exist"):
        load_text_encoder(tmp_path / "nowhere")


def test_missing_tokenizer_is_named(gemma_folder, tmp_path):
    folder = _copy(gemma_folder, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SanaCheckpointError, match=r"copy has no tokenizer: expected tokenizer\.json or tokenizer\.model"):
        load_text_encoder(folder)


def test_missing_weights_are_named(gemma_folder, tmp_path):
    folder = _copy(gemma_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(SanaCheckpointError, match=r"copy has no weights: expected one of model\.safetensors"):
        load_text_encoder(folder)


def test_missing_shard_is_named(gemma_folder, tmp_path):
    folder = _copy(gemma_folder, tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SanaCheckpointError, match="missing shard.*model-00002-of-00002.safetensors"):
        load_text_encoder(folder)


def test_missing_config_is_named(gemma_folder, tmp_path):
    folder = _copy(gemma_folder, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(SanaCheckpointError, match="copy has no config.json"):
        load_text_encoder(folder)


def test_missing_tensors_are_named(gemma_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(gemma_folder, tmp_path)
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SanaCheckpointError, match=r"lack 1 tensor\(s\): layers\.1\.mlp\.down_proj"):
        load_text_encoder(folder)


def test_non_gemma2_config_is_rejected(gemma_folder, tmp_path):
    folder = _copy(gemma_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SanaCheckpointError, match="model_type 'llama'"):
        load_text_encoder(folder)
