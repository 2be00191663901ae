"""The DiT trainer on a tiny cache: data, loss going down, exact resume, exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sana import load_dit
from sana.dcae import DCAE
from sana.dcae_io import save_dcae
from trainer import shapes
from trainer.cache import LatentCache, build_cache
from trainer.data import BucketBatches, bucket_table, read_records, to_bucket
from trainer.tiny_models import build_text_encoder, tiny_dcae_config, tiny_dit_config
from trainer.train_dit import DiTTrainConfig, flow_matching_loss, train_dit

PROMPTS = [shapes.caption(s) for s in shapes.all_scenes()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A 24-image shapes dataset (2 broken files among them), a tiny text encoder and f8 DC-AE, and their cache."""
    root = tmp_path_factory.mktemp("trainer")
    data = shapes.write_dataset(root / "data", 24, side=32, seed=0)
    (data / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (data / "zz_truncated.txt").write_text("a red circle on the left\n")
    (data / "zz_text.png").write_text("not an image")
    (data / "zz_text.txt").write_text("a blue square\n")
    encoder_dir = build_text_encoder(root / "text_encoder", PROMPTS, hidden_size=32, intermediate_size=64, head_dim=16)
    torch.manual_seed(0)
    dcae = DCAE(tiny_dcae_config(latent_channels=8, widths=(8, 16, 16, 32)))
    save_dcae(dcae, root / "vae")
    summary = build_cache(
        read_records(data), root / "cache", vae=root / "vae", text_encoder=encoder_dir,
        resolution=32, shard_size=10, sample_prompts=PROMPTS[:2], min_psnr=0, progress=False,
    )
    arch = tiny_dit_config(8, 32, 4, hidden_size=64, depth=2)
    (root / "dit.json").write_text(json.dumps(arch.to_dict()))
    return {"root": root, "data": data, "summary": summary, "cache": root / "cache", "arch": root / "dit.json", "vae": root / "vae"}


def _config(world, out: Path, **changes) -> DiTTrainConfig:
    base = dict(output_dir=str(out), cache_dir=str(world["cache"]), model=str(world["arch"]), steps=6, batch_size=4,
                lr=2e-3, warmup_steps=2, save_every=3, log_every=1, progress=False, ema_decay=0.9, report_to="none")
    return DiTTrainConfig(**{**base, **changes})


def test_cache_skips_and_counts_broken_images(world):
    summary = world["summary"]
    assert summary["samples"] == 24 and summary["skipped_count"] == 2
    assert sorted(Path(p).name for p in summary["skipped"]) == ["zz_text.png", "zz_truncated.png"]
    cache = LatentCache(world["cache"])
    latent, text = cache[0]
    assert latent.shape == (8, 4, 4) and text.shape[-1] == 32 and 1 < text.shape[0] < 20
    assert cache.sample_prompts == PROMPTS[:2] and len(cache.sample_texts) == 2


def test_cache_build_resumes_missing_shards(world, tmp_path, monkeypatch):
    """Deleting a shard and rebuilding recomputes only that shard, byte-identical."""
    copy = tmp_path / "cache"
    shutil.copytree(world["cache"], copy)
    shard = copy / "shard_00001.safetensors"
    original = shard.read_bytes()
    shard.unlink()
    options = dict(vae=world["vae"], text_encoder=world["root"] / "text_encoder", resolution=32, shard_size=10,
                   sample_prompts=PROMPTS[:2], min_psnr=0, progress=False)
    rebuilt = build_cache(read_records(world["data"]), copy, **options)
    assert rebuilt["samples"] == 24 and shard.read_bytes() == original

    def no_loading(*args, **kwargs):
        raise AssertionError("a complete cache loaded a model")

    monkeypatch.setattr("sana.dcae_io.load_dcae", no_loading)
    monkeypatch.setattr("sana.text_encoder.load_text_encoder", no_loading)
    assert build_cache(read_records(world["data"]), copy, **options)["complete"]


def test_jsonl_manifest_and_buckets(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "m.jsonl").write_text('{"image": "wide.png", "caption": "wide"}\nnot json\n{"file": "x.png"}\n')
    with pytest.warns(UserWarning):
        records = read_records(tmp_path / "m.jsonl")
    assert [(r.image.name, r.caption) for r in records] == [("wide.png", "wide")]
    table = bucket_table(64, 8)
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in table.values())
    assert to_bucket(np.zeros((40, 80, 3), np.uint8), table).shape[-2:] == (48, 88)
    assert bucket_table(1024, 32)["1.0"] == (1024, 1024)
    batches = BucketBatches([(4, 4)] * 5 + [(4, 8)] * 7, batch_size=2, seed=1)
    epoch = batches.epoch(0)
    assert epoch == batches.epoch(0) and epoch != batches.epoch(1) and len(epoch) == 2 + 3
    assert all(len({(4, 4) if i < 5 else (4, 8) for i in b}) == 1 for b in epoch)


def _fixed_batch_loss(model, cache: LatentCache) -> float:
    """The loss on the first four samples with fixed noise and σ."""
    generator = torch.Generator().manual_seed(123)
    latents = torch.stack([cache[i][0] for i in range(4)])
    from trainer.data import pad_texts

    context, mask = pad_texts([cache[i][1] for i in range(4)])
    noise = torch.randn(latents.shape, generator=generator)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
    with torch.no_grad():
        return float(flow_matching_loss(model, latents, context, mask, noise, sigma, None))


def test_training_lowers_the_loss_on_a_fixed_batch(world, tmp_path):
    config = _config(world, tmp_path / "run", steps=40, save_every=0, ema_decay=0.0, caption_dropout=0.0)
    result = train_dit(config)
    cache = LatentCache(world["cache"])
    torch.manual_seed(config.seed)
    from sana.dit import SanaDiT, SanaDiTConfig

    initial = SanaDiT(SanaDiTConfig.from_dict(json.loads(Path(world["arch"]).read_text())).replace(
        in_channels=8, out_channels=8, caption_channels=32))
    trained = load_dit(tmp_path / "run" / "transformer")
    before, after = _fixed_batch_loss(initial, cache), _fixed_batch_loss(trained, cache)
    assert after < 0.7 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41)) and result["step"] == 40
    assert np.mean([r["loss"] for r in rows[-10:]]) < np.mean([r["loss"] for r in rows[:5]])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_resume_reproduces_the_uninterrupted_run_exactly(world, tmp_path):
    straight = _config(world, tmp_path / "straight", sample_every=3, vae=str(world["vae"]), sample_steps=2)
    train_dit(straight)
    # "Interrupted" at step 3: a run that stops there, then a second process that resumes it.
    train_dit(_config(world, tmp_path / "resumed", steps=3))
    train_dit(_config(world, tmp_path / "resumed"))
    for name in ("transformer", "transformer_ema"):
        a = load_dit(tmp_path / "straight" / name).state_dict()
        b = load_dit(tmp_path / "resumed" / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (tmp_path / "straight" / "loss.jsonl").read_text() != ""
    loss_a = [json.loads(x)["loss"] for x in (tmp_path / "straight" / "loss.jsonl").read_text().splitlines()]
    loss_b = [json.loads(x)["loss"] for x in (tmp_path / "resumed" / "loss.jsonl").read_text().splitlines()]
    assert loss_a == loss_b
    ema = load_dit(tmp_path / "straight" / "transformer_ema").state_dict()
    raw = load_dit(tmp_path / "straight" / "transformer").state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # the EMA export is not the raw weights
    assert (tmp_path / "straight" / "samples" / "step_0000006.png").is_file()
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").glob("step_*")) == ["step_0000003", "step_0000006"]


def test_mixed_precision_and_accumulation_run(world, tmp_path):
    """bf16 autocast + checkpointing + 2 accumulation micro-steps: finite, and accumulation of
    two halves equals one full batch in fp32."""
    train_dit(_config(world, tmp_path / "bf16", steps=2, mixed_precision="bf16", grad_checkpointing=True, grad_accum=2))
    assert all(np.isfinite(json.loads(x)["loss"]) for x in (tmp_path / "bf16" / "loss.jsonl").read_text().splitlines())
    train_dit(_config(world, tmp_path / "acc1", steps=2, ema_decay=0.0))
    train_dit(_config(world, tmp_path / "acc2", steps=2, ema_decay=0.0, grad_accum=2))
    a = load_dit(tmp_path / "acc1" / "transformer").state_dict()
    b = load_dit(tmp_path / "acc2" / "transformer").state_dict()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
