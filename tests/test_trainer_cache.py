"""The latent cache (issue 18 §1, §4): encoded a batch at a time on the chosen device and dtype,
incremental, never reused when what it was built from changed; bucket merging, mirrored images,
the DC-AE's reconstruction check, the resolution taken from the DiT."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sana.errors import SanaCheckpointError, SanaInputError
from test_trainer import PROMPTS, world  # noqa: F401  (the shared tiny models)
from trainer.cache import LatentCache, build_cache
from trainer.data import merge_small_buckets, read_records


def _dataset(folder: Path, count: int, *, start: int = 0, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """`count` random images with captions; image i is `img_{start + i}.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + start)
    for i in range(start, start + count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.txt").write_text(PROMPTS[i % len(PROMPTS)] + "\n")
    return folder


def _build(world, data: Path, cache: Path, **changes):  # noqa: F811
    options = dict(vae=world["vae"], text_encoder=world["root"] / "text_encoder", resolution=32, shard_size=4, batch_size=2,
                   max_length=32, min_psnr=0, progress=False)
    return build_cache(read_records(data), cache, **{**options, **changes})


def _shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard_*.safetensors"))}


class _Loads:
    """Counts the models `build_cache` loads (a current cache loads none)."""

    def __init__(self, monkeypatch):
        import sana.dcae_io
        import sana.text_encoder

        self.dcae = self.text = 0
        real_dcae, real_text = sana.dcae_io.load_dcae, sana.text_encoder.load_text_encoder

        def load_dcae(*args, **kwargs):
            self.dcae += 1
            return real_dcae(*args, **kwargs)

        def load_text_encoder(*args, **kwargs):
            self.text += 1
            return real_text(*args, **kwargs)

        monkeypatch.setattr(sana.dcae_io, "load_dcae", load_dcae)
        monkeypatch.setattr(sana.text_encoder, "load_text_encoder", load_text_encoder)


def test_new_images_are_added_incrementally(world, tmp_path, monkeypatch):  # noqa: F811
    data = _dataset(tmp_path / "data", 6)
    first = _build(world, data, tmp_path / "cache")
    before = _shard_bytes(tmp_path / "cache")
    assert first["samples"] == 6 and sorted(before) == ["shard_00000.safetensors", "shard_00001.safetensors"]

    _dataset(data, 3, start=6)
    loads = _Loads(monkeypatch)
    second = _build(world, data, tmp_path / "cache")
    after = _shard_bytes(tmp_path / "cache")
    assert second["samples"] == 9 and loads.dcae == 1 and loads.text == 1
    assert {name: after[name] for name in before} == before  # the old shards are untouched
    new = LatentCache(tmp_path / "cache")
    assert len(new) == 9 and sorted(m["key"] for m in new.meta) == [f"img_{i:03d}.png" for i in range(9)]

    loads = _Loads(monkeypatch)
    assert _build(world, data, tmp_path / "cache")["samples"] == 9
    assert (loads.dcae, loads.text) == (0, 0)  # current: nothing loaded, nothing written
    assert _shard_bytes(tmp_path / "cache") == after


def test_changed_captions_and_images_are_refused_naming_them(world, tmp_path):  # noqa: F811
    data = _dataset(tmp_path / "data", 4)
    _build(world, data, tmp_path / "cache")
    os.utime(data / "img_000.png", (1, 1))  # touched, same content: still current
    assert _build(world, data, tmp_path / "cache")["samples"] == 4

    (data / "img_001.txt").write_text("a different caption\n")
    with pytest.raises(SanaCheckpointError, match=r"1 caption\(s\) changed \(img_001.png: .* → 'a different caption'\)"):
        _build(world, data, tmp_path / "cache")
    (data / "img_001.txt").write_text(PROMPTS[1] + "\n")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "img_002.png")
    with pytest.raises(SanaCheckpointError, match=r"1 image\(s\) changed \(img_002.png\)"):
        _build(world, data, tmp_path / "cache")


@pytest.mark.parametrize(("changes", "named"), [
    ({"resolution": 64}, "--resolution 32 (cache) → 64 (now)"),
    ({"max_length": 16}, "--max-length 32 (cache) → 16 (now)"),
    ({"chi": False}, "--chi True (cache) → False (now)"),
    ({"flip": True}, "--flip False (cache) → True (now)"),
    ({"dtype": "bfloat16"}, "--dtype 'float32' (cache) → 'bfloat16' (now)"),
])
def test_other_settings_are_refused_naming_each_change(world, tmp_path, changes, named):  # noqa: F811
    data = _dataset(tmp_path / "data", 2)
    _build(world, data, tmp_path / "cache")
    with pytest.raises(SanaCheckpointError, match="other settings") as error:
        _build(world, data, tmp_path / "cache", **changes)
    assert named in str(error.value)


@pytest.mark.parametrize(("part", "named"), [("vae", "the DC-AE (--vae"), ("text_encoder", "the text encoder (--text-encoder")])
def test_changed_model_files_are_refused(world, tmp_path, part, named):  # noqa: F811
    data = _dataset(tmp_path / "data", 2)
    copy = tmp_path / part
    shutil.copytree(world["vae"] if part == "vae" else world["root"] / "text_encoder", copy)
    _build(world, data, tmp_path / "cache", **{part: copy})
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "note": "edited"}))  # same weights, another file
    with pytest.raises(SanaCheckpointError, match="other settings") as error:
        _build(world, data, tmp_path / "cache", **{part: copy})
    assert re.search(re.escape(named) + r", its files' content\) sha256:\w+… \(cache\) → sha256:\w+… \(now\)", str(error.value))


def test_new_sample_prompts_reencode_the_extras_only(world, tmp_path, monkeypatch):  # noqa: F811
    data = _dataset(tmp_path / "data", 2)
    _build(world, data, tmp_path / "cache", sample_prompts=PROMPTS[:1])
    shards = _shard_bytes(tmp_path / "cache")
    loads = _Loads(monkeypatch)
    _build(world, data, tmp_path / "cache", sample_prompts=PROMPTS[1:3])
    assert (loads.dcae, loads.text) == (0, 1) and _shard_bytes(tmp_path / "cache") == shards
    assert LatentCache(tmp_path / "cache").sample_prompts == PROMPTS[1:3]


def test_removed_images_leave_training_and_are_reported(world, tmp_path):  # noqa: F811
    data = _dataset(tmp_path / "data", 4)
    _build(world, data, tmp_path / "cache")
    (data / "img_003.png").unlink()
    with pytest.warns(UserWarning, match=r"1 cached image\(s\) are no longer in the data source"):
        summary = _build(world, data, tmp_path / "cache")
    assert summary["removed"] == ["img_003.png"] and summary["samples"] == 3
    assert len(LatentCache(tmp_path / "cache")) == 3


def test_pixels_in_memory_are_bounded_by_the_batch(world, tmp_path, monkeypatch):  # noqa: F811
    """Images are read a batch at a time: never more than --batch-size decoded before they are
    encoded (the old build decoded a whole shard first)."""
    import trainer.cache

    data = _dataset(tmp_path / "data", 7)
    loaded, most = [0], [0]
    real_load, real_encode = trainer.cache.load_fitted, trainer.cache._Encoders.encode_images

    def load_fitted(*args, **kwargs):
        loaded[0] += 1
        most[0] = max(most[0], loaded[0])
        return real_load(*args, **kwargs)

    def encode_images(self, pixels):
        loaded[0] = 0
        return real_encode(self, pixels)

    monkeypatch.setattr(trainer.cache, "load_fitted", load_fitted)
    monkeypatch.setattr(trainer.cache._Encoders, "encode_images", encode_images)
    assert _build(world, data, tmp_path / "cache", shard_size=7, batch_size=3)["samples"] == 7
    assert most[0] == 3


def test_bf16_encoding_stores_the_encoder_dtype(world, tmp_path):  # noqa: F811
    data = _dataset(tmp_path / "data", 2)
    summary = _build(world, data, tmp_path / "cache", dtype="bfloat16")
    cache = LatentCache(tmp_path / "cache")
    latent, text = cache[0]
    assert summary["settings"]["dtype"] == "bfloat16" and text.dtype == torch.bfloat16 and latent.dtype == torch.float32
    with pytest.raises(SanaInputError, match="--dtype 'float16'"):
        _build(world, data, tmp_path / "other", dtype="float16")


def test_flipped_latents_are_the_mirrored_images_encodings(world, tmp_path):  # noqa: F811
    from sana.dcae_io import load_dcae
    from trainer.data import load_fitted

    data = _dataset(tmp_path / "data", 2)
    _build(world, data, tmp_path / "cache", flip=True)
    cache = LatentCache(tmp_path / "cache")
    dcae = load_dcae(world["vae"], dtype=torch.float32)
    pixels = load_fitted(data / cache.meta[0]["key"], size=(32, 32))
    with torch.no_grad():
        expected = dcae.encode(pixels.flip(-1)[None])[0] * dcae.scaling_factor
    assert torch.allclose(cache.flipped(0), expected, atol=1e-6) and not torch.allclose(cache[0][0], expected, atol=1e-3)
    _build(world, data, tmp_path / "plain")
    with pytest.raises(SanaInputError, match="--flip"):
        LatentCache(tmp_path / "plain").flipped(0)


def test_small_buckets_are_merged_into_the_nearest():
    # 2 square images, 1 slightly wide, 5 very wide: with a minimum of 3 the wide one joins the squares.
    counts = {(32, 32): 2, (32, 40): 1, (24, 64): 5}
    assert merge_small_buckets(counts, 3) == {(32, 40): (32, 32)}
    assert merge_small_buckets(counts, 1) == {}
    # Below 10 everything ends in one bucket, and an earlier move follows its target.
    assert merge_small_buckets(counts, 10) == {(32, 40): (24, 64), (32, 32): (24, 64)}


def test_min_bucket_size_merges_at_cache_time(world, tmp_path):  # noqa: F811
    data = _dataset(tmp_path / "data", 4)
    _dataset(data, 1, start=4, size=(32, 64))  # one wide image: a bucket of its own
    alone = _build(world, data, tmp_path / "alone")
    merged = _build(world, data, tmp_path / "merged", min_bucket_size=2)
    assert len(alone["buckets"]) == 2 and merged["buckets"] == {"32x32": 5}


def test_poor_reconstructions_and_upscaling_are_warned_about(world, tmp_path):  # noqa: F811
    data = _dataset(tmp_path / "data", 2, size=(16, 16))
    with pytest.warns(UserWarning) as caught:
        summary = _build(world, data, tmp_path / "cache", min_psnr=40.0)
    messages = " ".join(str(w.message) for w in caught)
    assert "reconstructs these images poorly (PSNR" in messages and "upscaled (up to 2×)" in messages
    assert summary["psnr_db"] < 40 and summary["largest_upscale"] == 2.0


def test_cache_cli_takes_the_resolution_from_the_dit(world, tmp_path, capsys):  # noqa: F811
    from sana.dit import SanaDiT, SanaDiTConfig
    from sana.dit_io import save_dit
    from trainer.__main__ import main

    data = _dataset(tmp_path / "data", 2)
    arch = SanaDiTConfig.from_dict(json.loads(Path(world["arch"]).read_text())).replace(in_channels=8, out_channels=8, caption_channels=32)
    save_dit(SanaDiT(arch), tmp_path / "dit")
    common = ["cache", "--data", str(data), "--vae", str(world["vae"]), "--text-encoder", str(world["root"] / "text_encoder"),
              "--max-length", "32", "--device", "cpu", "--min-psnr", "0", "--no-progress"]
    assert main([*common, "--cache-dir", str(tmp_path / "none")]) == 2
    assert "--resolution: give the training resolution" in capsys.readouterr().err
    assert main([*common, "--cache-dir", str(tmp_path / "cache"), "--dit", str(tmp_path / "dit")]) == 0
    assert "--resolution 32 (the training resolution" in capsys.readouterr().err  # sample_size 4 × the f8 DC-AE
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["settings"]["resolution"] == 32


def test_a_cache_of_the_previous_version_still_trains_but_is_not_extended(world, tmp_path):  # noqa: F811
    """Version 2 wrote the shard count, no settings and no keys: LatentCache reads it; build_cache
    refuses to add to it rather than mix formats."""
    data = _dataset(tmp_path / "data", 2)
    _build(world, data, tmp_path / "cache")
    summary = json.loads((tmp_path / "cache" / "cache.json").read_text())
    old = {"settings": {"version": 2, "resolution": 32, "max_length": 32, "chi": True, "records": 2}, "complete": True,
           "shards": len(summary["shards"]), "samples": 2, "skipped": [], "skipped_count": 0}
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(old))
    assert len(LatentCache(tmp_path / "cache")) == 2
    with pytest.raises(SanaCheckpointError, match="a cache of an earlier version"):
        _build(world, data, tmp_path / "cache")
