"""LoRA: trainer adapters → diffusers/PEFT file → sana.load_lora and diffusers' Sana LoRA loader agree."""

from __future__ import annotations

import json

import pytest
import torch

from sana.dit import SanaDiT
from sana.dit_io import save_dit
from sana.errors import SanaCheckpointError
from sana.lora import inject_lora, load_lora, lora_targets, merge_lora, save_lora
from trainer.tiny_models import tiny_dit_config

TARGETS = ["to_q", "to_k", "to_v", "attn1.to_out.0", "conv_inverted"]


def _model() -> SanaDiT:
    torch.manual_seed(0)
    return SanaDiT(tiny_dit_config(8, 32, 4, hidden_size=64, depth=2)).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 4, 4, generator=g)
    t = torch.tensor([300.0, 700.0])
    context = torch.randn(2, 5, 32, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    return x, t, context, mask


def _trained_lora(rank=4, alpha=8.0) -> SanaDiT:
    model = _model()
    adapted = inject_lora(model, rank=rank, alpha=alpha, targets=TARGETS, seed=0)
    assert len(adapted) == 2 * (3 + 3 + 1 + 1)  # attn1/attn2 × q,k,v + attn1.to_out.0 + conv_inverted, per block
    with torch.no_grad():  # stand-in for training: B is zero after injection
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model


def test_injected_adapters_start_as_identity_and_train_only_lora():
    model, reference = _model(), _model()
    inject_lora(model, rank=2, targets=["to_k"])
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), reference(*_inputs()))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError):
        inject_lora(_model(), rank=2, targets=["nothing_like_this"])


def test_save_then_load_lora_reproduces_the_adapted_model(tmp_path):
    adapted = _trained_lora()
    with torch.no_grad():
        expected = adapted(*_inputs())
    save_lora(adapted, tmp_path / "lora.safetensors")
    loaded = load_lora(_model(), tmp_path / "lora.safetensors", scale=1.0)
    with torch.no_grad():
        assert torch.allclose(loaded(*_inputs()), expected, atol=1e-5)
        merged = merge_lora(adapted)(*_inputs())
        assert torch.allclose(merged, expected, atol=1e-5)
    half = load_lora(_model(), tmp_path / "lora.safetensors", scale=0.5)
    base = _model()
    with torch.no_grad():
        middle = (base(*_inputs()) + expected) / 2
        assert (half(*_inputs()) - middle).abs().max() < 0.1 * (expected - base(*_inputs())).abs().max()


def test_lora_keys_follow_the_diffusers_layout(tmp_path):
    from safetensors import safe_open

    save_lora(_trained_lora(), tmp_path / "lora.safetensors")
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        conv = f.get_tensor("transformer.transformer_blocks.0.ff.conv_inverted.lora_A.weight")
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.1.attn2.to_v.lora_B.weight" in keys
    assert conv.ndim == 4 and meta["transformer.r"] == meta["transformer.lora_alpha"] == 4


def test_bad_lora_files_are_rejected_before_any_change(tmp_path):
    from sana.checkpoint import write_safetensors

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_safetensors(tmp_path / "bad.safetensors", {
        "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
        "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4),
        "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.zeros(4, 65),
        "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.zeros(64, 4),
    })
    with pytest.raises(SanaCheckpointError, match="to_k"):
        load_lora(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_diffusers_sana_lora_loader_gives_the_same_model(tmp_path):
    pytest.importorskip("peft")
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    save_dit(_model(), tmp_path / "transformer")
    save_lora(_trained_lora(), tmp_path / "lora.safetensors")
    transformer = SanaTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors", adapter_name="shapes")
    x, t, context, mask = _inputs()
    ours = load_lora(_model(), tmp_path / "lora.safetensors")
    with torch.no_grad():
        expected = ours(x, t, context, mask)
        theirs = pipe.transformer(x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t, return_dict=False)[0]
        assert torch.allclose(theirs, expected, atol=1e-4), (theirs - expected).abs().max()
        pipe.set_adapters("shapes", 0.5)
        ours_half = load_lora(_model(), tmp_path / "lora.safetensors", scale=0.5)
        theirs_half = pipe.transformer(x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t, return_dict=False)[0]
        assert torch.allclose(theirs_half, ours_half(x, t, context, mask), atol=1e-4)
    assert set(lora_targets(_model())) >= {"transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.conv_point"}
