"""Generation at scale (issue 20), in one process: per-image seeds, the prompts file, batch mode's
outputs, failures and resumption, provenance (PNG text chunks, model hashes) and replay.

Models: the embedded shapes-tiny model (fp32 on the CPU, the command line's default there), and
a tiny random SANA-Sprint DiT for TrigFlow. The multi-process checks are in
test_batch_distributed.py.

Batching tolerance (stated once, used below): an image generated in a batch is the image its
seed gives its prompt alone, up to rounding. The noise is the same (one generator per image), the
caption columns another row adds are masked with a -10000 bias whose softmax weight underflows
to exactly 0 in fp32, and no layer mixes rows; what changes is the shape of every matrix
product (M = batch x tokens), so oneDNN/BLAS sum in another blocking: ~1e-7 relative per
product in fp32. Through 4 DiT blocks x 3-4 steps and the decoder that grew to at most 3.7e-6
on the [0, 1] image (measured at 64x64 px); BATCH_ATOL = 1e-4 leaves a 25x margin. In 8 bits a
value that close to a rounding boundary flips by one level, so PNGs agree within 1 level in at
most 0.1% of values (measured: 0 to 1 value of 49152). In bf16 (the GPU default) each product rounds to 2^-8, and
batched images differ by more: the exactness claims are for fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import sana
import sana.batch
import sana.pipeline
from node_fixtures import GEMMA_HIDDEN, random_dcae, random_dit, tiny_dit_config
from sana.batch import Defaults, Item, make_batches, output_name, read_items, resolve_request
from sana.cli import main
from sana.errors import SanaCheckpointError, SanaInputError, SanaNonFiniteError
from sana.png import encode_png, read_image, read_png_text, write_png
from sana.provenance import HashCache, model_hash, read_record
from tiny_gemma import build_tiny_gemma

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "shapes-tiny"
MODELS = ["--dit", str(SHIPPED / "transformer"), "--vae", str(SHIPPED / "vae"), "--text-encoder", str(SHIPPED / "text_encoder")]
FAST = ["--steps", "2", "--width", "32", "--height", "32", "--device", "cpu"]
BATCH_ATOL = 1e-4  # module docstring
PROMPTS = ["a red circle at the top left", "a big blue square", "two green triangles on the right", "a yellow star"]

pytestmark = pytest.mark.skipif(not (SHIPPED / "transformer").is_dir(), reason="shipped model absent")


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    """Each test's own file-hash cache (never the user's ~/.cache)."""
    monkeypatch.setenv("SANA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "file_hashes.json"


@pytest.fixture(scope="module")
def shipped() -> sana.batch.Parts:
    dtypes = {"dit": torch.float32, "vae": torch.float32, "text_encoder": torch.float32}
    paths = {"dit": SHIPPED / "transformer", "vae": SHIPPED / "vae", "text_encoder": SHIPPED / "text_encoder"}
    return sana.batch.load_parts(paths, dtypes, "cpu")


def _generate(parts, **kwargs) -> torch.Tensor:
    kwargs = {"steps": 3, "width": 64, "height": 64, "resolution_binning": False, **kwargs}
    return sana.generate(dit=parts.dit, dcae=parts.dcae, text_encoder=parts.text_encoder, **kwargs)


def _levels(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round()


def _png(path: Path) -> torch.Tensor:
    return read_image(path)[0]


def assert_batch_tolerance(batched: torch.Tensor, alone: torch.Tensor) -> None:
    """Float images within the batching tolerance of the module docstring, and not degenerate."""
    assert alone.std() > 0.005  # not a flat image: the comparison means something
    torch.testing.assert_close(batched, alone, rtol=0, atol=BATCH_ATOL)
    assert_png_tolerance(batched, alone)


def assert_png_tolerance(a: torch.Tensor, b: torch.Tensor) -> None:
    """8-bit images (as read back, or float ones rounded): at most 1 level apart in at most
    0.1% of the values, the batching tolerance once rounded."""
    assert _levels(b).std() > 1
    levels = (_levels(a) - _levels(b)).abs()
    assert levels.max() <= 1 and (levels > 0).sum() <= levels.numel() // 1000


# ---------------------------------------------------------------------------------------
# generate(seed=[...]): an image depends on its own seed, not on its batch


def test_an_image_in_a_batch_is_the_image_its_seed_gives_alone(shipped):
    seeds = [11, 2**64 - 1, 0]
    batched = _generate(shipped, prompt=PROMPTS[:3], seed=seeds)
    for i, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
        alone = _generate(shipped, prompt=prompt, seed=seed)[0]
        assert_batch_tolerance(batched[i], alone)
    # One prompt with a list of one seed is the same computation as the plain seed: exact.
    assert torch.equal(_generate(shipped, prompt=[PROMPTS[2]], seed=[0])[0], alone)
    # One seed for a batch draws the rows from one generator: row 1 is not seed 5's image alone.
    shared = _generate(shipped, prompt=PROMPTS[:2], seed=5)
    assert (shared[1] - _generate(shipped, prompt=PROMPTS[1], seed=5)[0]).abs().max() > 0.05


def test_trigflow_draws_each_images_step_noise_from_its_own_seed(tmp_path):
    """SANA-Sprint draws fresh noise every step: with a seed list, each image's from its own generator."""
    from sana import dcae as dcae_module

    dit = random_dit(sana, tiny_dit_config(sana, sprint=True, sample_size=2), seed=3)
    dcae = random_dcae(dcae_module)
    encoder = sana.load_text_encoder(build_tiny_gemma(tmp_path / "gemma", hidden_size=GEMMA_HIDDEN))
    kwargs = dict(dit=dit, dcae=dcae, text_encoder=encoder, steps=3, width=64, height=64, resolution_binning=False)
    batched = sana.generate(prompt=PROMPTS[:3], seed=[4, 5, 6], **kwargs)
    for i, seed in enumerate([4, 5, 6]):
        alone = sana.generate(prompt=PROMPTS[i], seed=seed, **kwargs)[0]
        torch.testing.assert_close(batched[i], alone, rtol=0, atol=BATCH_ATOL)
        assert alone.std() > 0.01


def test_seed_lists_are_checked_before_any_compute(shipped, monkeypatch):
    monkeypatch.setattr(sana.pipeline, "encode_prompts", lambda *a, **k: pytest.fail("computed before refusing"))
    with pytest.raises(SanaInputError, match=r"seed is a list of 3 seeds for 2 images"):
        _generate(shipped, prompt=PROMPTS[:2], seed=[1, 2, 3])
    with pytest.raises(SanaInputError, match=r"seed\[1\] must be an integer in \[0, 18446744073709551615\], got -1"):
        _generate(shipped, prompt=PROMPTS[:2], seed=[1, -1])
    with pytest.raises(SanaInputError, match="empty list"):
        _generate(shipped, prompt=PROMPTS[:2], seed=[])


# ---------------------------------------------------------------------------------------
# The prompts file


def test_every_bad_line_is_reported_at_once_before_any_model_loads(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(
        b'{"prompt": "fine", "seed": 3}\n'
        b'{"prompt": "too wide", "width": 20000}\n'
        b'not json\n'
        b'\n'
        b'{"prompt": "a cat", "guidance": 2}\n'
        b'["a list"]\n'
        b'{"prompt": "fine again"}\n'
        b'{"negative_prompt": "no prompt"}\n'
        b'{"prompt": "x", "seed": -1}\n'
        b'{"prompt": "x", "steps": 0}\n'
        b'{"prompt": "x", "cfg": NaN}\n'
        b'{"prompt": "x", "solver": "euler_a"}\n'
        b'{"prompt": "\xff\xfe"}\n'
        b'{"prompt": "x", "height": 0}\n'
    )
    monkeypatch.setattr(sana.batch, "load_parts", lambda *a, **k: pytest.fail("a model loaded before the file was checked"))
    monkeypatch.setattr(sana, "load_dit", lambda *a, **k: pytest.fail("a model loaded before the file was checked"))
    with pytest.raises(SanaInputError) as caught:
        read_items(bad)
    message = str(caught.value)
    assert message.startswith(f"--prompts {bad}: 11 bad lines (2-3, 5-6, 8-14): ")
    for expected in (
        "line 2: width must be an integer in [1, 16384], got 20000",
        "line 3: invalid JSON",
        "line 5: unknown key 'guidance'",
        "line 6: a JSON list, not an object",
        'line 8: "prompt" must be a string',
        "line 9: seed must be an integer in [0, 18446744073709551615], got -1",
        "line 10: steps must be an integer in [1, 10000], got 0",
        "line 11: cfg must be a finite number",
    ):
        assert expected in message
    assert "line 13: not UTF-8 text" in message and "and 1 more" in message  # details stop at 10 lines
    # The command line: one error line, status 2, nothing written.
    out = tmp_path / "out"
    assert main(["generate", *MODELS, "--prompts", str(bad), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --prompts {bad}: 11 bad lines")
    assert not out.exists()


def test_nothing_else_in_a_prompts_file_is_refused(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "ünïcode 猫 🐈", "negative_prompt": "blurry, low quality", "meta": {"tag": "colors", "n": [1, 2]}},
        {"prompt": "", "seed": 2**64 - 1, "width": 16384, "height": 1, "steps": 10000, "cfg": -1000, "shift": 0.01,
         "pag": 1000, "solver": "flow_euler"},
        {"prompt": "nulls take the defaults", "seed": None, "width": None, "meta": None},
    ]
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(json.dumps(line, ensure_ascii=False) for line in lines).encode() + b"\r\n")
    items = read_items(jsonl)
    assert [(i.index, i.line, i.prompt) for i in items] == [(0, 1, lines[0]["prompt"]), (1, 3, ""), (2, 5, lines[2]["prompt"])]
    assert items[0].overrides == {"negative_prompt": "blurry, low quality"} and items[0].meta == lines[0]["meta"]
    assert items[1].overrides == {"seed": 2**64 - 1, "width": 16384, "height": 1, "steps": 10000, "guidance_scale": -1000,
                                  "flow_shift": 0.01, "pag_scale": 1000, "solver": "flow_euler"}
    assert items[2].overrides == {} and items[2].meta is None
    # A text file: every non-blank line is a prompt, verbatim (a .txt line may start with "{").
    text = tmp_path / "p.txt"
    text.write_text('{"prompt": "literally this"}\n\n  a cat, 8k  \n')
    assert [(i.index, i.line, i.prompt) for i in read_items(text)] == [(0, 1, '{"prompt": "literally this"}'), (1, 3, "a cat, 8k")]
    # No suffix: JSONL when the first line is an object.
    bare = tmp_path / "prompts"
    bare.write_text('{"prompt": "a"}\n')
    assert read_items(bare)[0].prompt == "a"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SanaInputError, match="holds no prompts"):
        read_items(empty)
    with pytest.raises(SanaCheckpointError, match="cannot read"):
        read_items(tmp_path / "missing.txt")


def test_an_items_seed_depends_on_the_item_alone_and_batches_share_a_shape(shipped):
    items = [Item(0, 1, "a"), Item(1, 2, "b", {"width": 64}), Item(2, 3, "c", {"seed": 7}), Item(3, 4, "d"), Item(4, 5, "e")]
    defaults = Defaults(seed=2**64 - 2, width=32, height=32)
    requests = {
        i.index: resolve_request(shipped.dit, shipped.dcae, prompt=i.prompt, seed=sana.batch.item_seed(i, defaults.seed),
                                 defaults=defaults, overrides=i.overrides)
        for i in items
    }
    assert [requests[i]["seed"] for i in range(5)] == [2**64 - 2, 2**64 - 1, 7, 1, 2]  # base + number, mod 2^64
    assert requests[0]["steps"] == 20 and requests[0]["flow_shift"] == shipped.dit.config.flow_shift
    assert make_batches(range(5), requests, 2) == [[0, 2], [3, 4], [1]]  # item 1 is 64 px wide
    assert output_name(7, 12) == "000007.png" and output_name(7, 10**7) == "0000007.png"


# ---------------------------------------------------------------------------------------
# Batch runs: outputs, records, failures, resumption


def _jsonl(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


# A1111's infotext grammar: "Key: value" pairs, a value JSON-quoted when it holds , : or a newline.
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    pairs = {key: json.loads(value) if value.startswith('"') else value for key, value in A1111_PAIR.findall(last)}
    negative = [line for line in lines if line.startswith("Negative prompt: ")]
    pairs["Prompt"] = "\n".join(line for line in lines if not line.startswith("Negative prompt: "))
    pairs["Negative prompt"] = negative[0][len("Negative prompt: "):] if negative else ""
    return pairs


def test_batch_mode_writes_each_item_with_its_record_and_an_index(tmp_path, shipped, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": PROMPTS[0], "negative_prompt": "blurry, dark: bad"},
        {"prompt": PROMPTS[1], "width": 64, "seed": 99, "meta": {"id": "b"}},
        {"prompt": PROMPTS[2], "cfg": 3.0},
        {"prompt": "ünïcode ★"},
        {"prompt": PROMPTS[3]},
    ])
    out = tmp_path / "out"
    assert main(["generate", *MODELS, *FAST, "--prompts", str(prompts), "--out-dir", str(out), "--batch-size", "3", "--seed", "40"]) == 0
    err = capsys.readouterr().err
    assert "done 5, skipped 0 (already there), failed 0" in err and "images/s" in err
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert index[1] == {"item": 1, "line": 2, "file": "000001.png", "status": "ok", "prompt": PROMPTS[1], "seed": 99, "meta": {"id": "b"}}
    assert [e["seed"] for e in index] == [40, 99, 42, 43, 44] and all(e["status"] == "ok" for e in index)
    dit_hash = model_hash(SHIPPED / "transformer", "dit")
    for entry in index:
        path = out / entry["file"]
        record = read_record(path)
        request = record["request"]
        assert request["prompt"] == entry["prompt"] and request["seed"] == entry["seed"]
        assert record["models"]["dit"]["sha256"] == dit_hash and record["version"].startswith("sana-comfy ")
        if entry["item"] in (1, 3):  # alone in its batch, and batched with others
            # The image is what its request gives alone, within the batching tolerance.
            alone = sana.generate(dit=shipped.dit, dcae=shipped.dcae, text_encoder=shipped.text_encoder, **request)[0]
            assert_png_tolerance(_png(path), alone)
        # The A1111 infotext, as A1111-style readers parse it (Pillow reads tEXt and iTXt alike).
        with Image.open(path) as image:
            info = parse_a1111(image.text["parameters"])
            assert (image.width, image.height) == (request["width"], request["height"])
        assert info["Prompt"] == entry["prompt"] and info["Seed"] == str(entry["seed"])
        assert info["Steps"] == "2" and info["Sampler"] == "flow_dpm_solver" and info["Size"] == f"{request['width']}x32"
        assert info["CFG scale"] == ("3" if entry["item"] == 2 else "4.5")
        assert info["Model hash"] == dit_hash[:10] and info["Model"] == "shapes-tiny/transformer"
        assert info["Version"] == record["version"]
    assert parse_a1111(Image.open(out / "000000.png").text["parameters"])["Negative prompt"] == "blurry, dark: bad"


def test_failed_items_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "fine"},
        {"prompt": "poison"},  # its batch produces NaN
        {"prompt": "not a multiple of 32", "width": 40},  # refused by the model with binning off
        {"prompt": "trigflow needs a Sprint DiT", "solver": "trigflow"},
        {"prompt": "a stranger's file holds my name"},
        {"prompt": "fine too"},
    ])
    out = tmp_path / "out"
    out.mkdir()
    stranger = out / "000004.png"
    stranger.write_bytes(b"not mine")
    real_generate = sana.batch.generate

    def poisoned(**kwargs):
        if "poison" in kwargs["prompt"]:
            raise SanaNonFiniteError("denoising produced NaN at step 1 of 2")
        return real_generate(**kwargs)

    monkeypatch.setattr(sana.batch, "generate", poisoned)
    args = ["generate", *MODELS, *FAST, "--no-binning", "--prompts", str(prompts), "--out-dir", str(out), "--batch-size", "4"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "done 2, skipped 0 (already there), failed 4" in err
    index = {e["item"]: e for e in map(json.loads, (out / "index.jsonl").read_text().splitlines())}
    assert [index[i]["status"] for i in range(6)] == ["ok", "failed", "failed", "failed", "failed", "ok"]
    assert index[1]["error"] == "SanaNonFiniteError: denoising produced NaN at step 1 of 2" and index[1]["file"] is None
    assert "SanaInputError" in index[2]["error"] and "not a multiple of 32" in index[2]["error"]
    assert "'trigflow' needs a SANA-Sprint DiT" in index[3]["error"]
    assert f"{stranger} exists and is not this item's image" in index[4]["error"]
    assert stranger.read_bytes() == b"not mine"  # never overwritten
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000004.png", "000005.png"]

    # The rerun skips what is done and retries the rest: the NaN was transient this time.
    monkeypatch.setattr(sana.batch, "generate", real_generate)
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("000000.png", "000005.png")}
    assert main(args) == 1
    assert "done 1, skipped 2 (already there), failed 3" in capsys.readouterr().err
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    assert json.loads((out / "index.jsonl").read_text().splitlines()[1])["status"] == "ok"


def test_an_output_made_with_other_settings_is_not_taken_for_done(tmp_path, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    out = tmp_path / "out"
    base = ["generate", *MODELS, *FAST, "--prompts", str(prompts), "--out-dir", str(out)]
    assert main(base) == 0
    before = (out / "000001.png").read_bytes()
    assert main([*base, "--cfg", "2"]) == 1
    assert "failed 2" in capsys.readouterr().err
    error = json.loads((out / "index.jsonl").read_text().splitlines()[1])["error"]
    assert "exists and is not this item's image (guidance_scale 4.5 instead of 2.0)" in error
    assert (out / "000001.png").read_bytes() == before


def test_batch_mode_options_are_checked_before_loading(tmp_path, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    for args, message in (
        (["--prompts", str(prompts), "--out", "x.png"], "--prompts writes into --out-dir DIR"),
        (["--prompts", str(prompts)], "--prompts writes into --out-dir DIR"),
        (["--prompt", "a", "--out-dir", str(tmp_path)], "--out-dir is for --prompts"),
        (["--prompt", "a"], "--prompt needs --out"),
        ([], "give one of --prompt TEXT"),
        (["--prompt", "a", "--prompts", str(prompts), "--out-dir", "o"], "got --prompt and --prompts"),
        (["--prompts", str(prompts), "--out-dir", str(prompts)], f"--out-dir {prompts} is a file"),
        (["--prompts", str(prompts), "--out-dir", str(tmp_path / "o"), "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ):
        assert main(["generate", *MODELS, *FAST, *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "--prompts", str(prompts), "--out-dir", str(tmp_path / "o")]) == 2
    assert "missing --dit, --vae, --text-encoder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Provenance: PNG text chunks, model hashes


def test_png_text_chunks_round_trip_and_an_incomplete_png_is_refused(tmp_path):
    image = torch.rand(5, 7, 3, generator=torch.Generator().manual_seed(0))
    text = {"parameters": "a cat, 8k\nSteps: 2", "sana": '{"prompt": "猫 ★"}'}
    path = tmp_path / "x.png"
    write_png(path, image, text)
    assert read_png_text(path) == text
    with Image.open(path) as opened:
        assert opened.text == text  # tEXt for Latin-1, iTXt for the rest: Pillow reads both
        assert torch.equal(torch.frombuffer(bytearray(opened.tobytes()), dtype=torch.uint8).reshape(5, 7, 3), _levels(image).to(torch.uint8))
    data = path.read_bytes()
    for name, damaged in (("truncated", data[:-5]), ("cut", data[: len(data) // 2]), ("grown", data + b"x"), ("other", b"GIF89a")):
        (tmp_path / f"{name}.png").write_bytes(damaged)
        with pytest.raises(SanaCheckpointError, match=f"{name}.png"):
            read_png_text(tmp_path / f"{name}.png")
    assert encode_png(image) == encode_png(image, {})


def test_model_hash_reads_each_file_once_until_it_changes(tmp_path, monkeypatch):
    folder = tmp_path / "pipeline"
    shutil.copytree(SHIPPED, folder)
    (folder / "transformer" / ".cache").mkdir()
    (folder / "transformer" / ".cache" / "junk").write_text("hidden files are not the model")
    reads = []
    real = sana.provenance.file_sha256
    monkeypatch.setattr(sana.provenance, "file_sha256", lambda f: reads.append(f.name) or real(f))
    cache = HashCache(tmp_path / "hashes.json")
    digest = model_hash(folder, "dit", cache)  # a pipeline root: its transformer/ only
    files = sorted((folder / "transformer").glob("*"), key=lambda f: f.name)
    listing = "".join(f"{f.name}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files if f.is_file())
    assert digest == hashlib.sha256(listing.encode()).hexdigest()
    assert sorted(reads) == ["config.json", "diffusion_pytorch_model.safetensors"]
    cache.save()
    assert model_hash(folder / "transformer", "dit", HashCache(tmp_path / "hashes.json")) == digest  # cached on disk
    assert len(reads) == 2
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(time.time_ns(), weights.stat().st_mtime_ns + 10**9))
    assert model_hash(folder, "dit", HashCache(tmp_path / "hashes.json")) == digest
    assert reads[2:] == ["diffusion_pytorch_model.safetensors"]  # rehashed because its mtime moved
    single = folder / "vae" / "diffusion_pytorch_model.safetensors"
    assert model_hash(single, "vae", cache) == hashlib.sha256(single.read_bytes()).hexdigest()  # A1111's AutoV2 base


# ---------------------------------------------------------------------------------------
# Replay


def test_replay_reproduces_an_image_from_its_own_record(tmp_path, capsys):
    out = tmp_path / "cats.png"
    single = ["generate", *MODELS, "--steps", "3", "--width", "64", "--height", "32", "--device", "cpu", "--out", str(out),
              "--prompt", "a red circle", "--prompt", "a blue square", "--negative-prompt", "blurry", "--pag", "1.5",
              "--shift", "2.5"]
    assert main(single) == 0
    second = tmp_path / "cats-1.png"
    assert read_record(second)["image_index"] == 1 and "seed " in capsys.readouterr().err  # a random seed, recorded
    again = tmp_path / "again.png"
    assert main(["generate", "--replay", str(second), "--out", str(again)]) == 0
    assert f"replayed {second} -> {again}: identical pixels" in capsys.readouterr().err
    assert torch.equal(_png(again), _png(second))
    assert read_record(again)["request"] == read_record(second)["request"]

    # A batch item: replayed alone, within the batching tolerance.
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    assert main(["generate", *MODELS, *FAST, "--prompts", str(prompts), "--out-dir", str(tmp_path / "out"), "--batch-size", "3"]) == 0
    item = tmp_path / "out" / "000002.png"
    assert main(["generate", "--replay", str(item)]) == 0
    assert_png_tolerance(_png(tmp_path / "out" / "000002-replay.png"), _png(item))


def test_replay_finds_moved_files_and_refuses_other_ones(tmp_path, capsys):
    """Image to image with a DiT that later moves: the replay names what is missing, takes the
    file given instead when its hash is the recorded one, and refuses other files."""
    source = tmp_path / "in.png"
    write_png(source, torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(3)))
    moved = tmp_path / "moved" / "transformer"
    shutil.copytree(SHIPPED / "transformer", moved)
    out = tmp_path / "a.png"
    models = [str(moved) if arg == str(SHIPPED / "transformer") else arg for arg in MODELS]
    assert main(["generate", *models, *FAST, "--out", str(out), "--prompt", "a", "--seed", "1", "--image", str(source),
                 "--strength", "0.5"]) == 0
    assert read_record(out)["image"]["path"] == str(source)
    shutil.rmtree(moved)
    assert main(["generate", "--replay", str(out)]) == 2
    assert f"error: {out} was made with {moved}, which is not there; give the file with --dit" in capsys.readouterr().err
    assert main(["generate", "--replay", str(out), "--dit", str(SHIPPED / "transformer")]) == 0
    assert "identical pixels" in capsys.readouterr().err

    changed = tmp_path / "changed" / "transformer"
    shutil.copytree(SHIPPED / "transformer", changed)
    with open(changed / "config.json", "a") as f:
        f.write("\n")  # the same weights, another file: another hash
    assert main(["generate", "--replay", str(out), "--dit", str(changed)]) == 2
    err = capsys.readouterr().err
    assert f"error: {changed} has SHA-256" in err and f"but {out} was made with" in err and "--dit" in err
    assert main(["generate", "--replay", str(out), "--dit", str(SHIPPED / "transformer"), "--out", str(out)]) == 2
    assert "is the image being replayed" in capsys.readouterr().err
    write_png(source, torch.zeros(32, 32, 3))
    assert main(["generate", "--replay", str(out), "--dit", str(SHIPPED / "transformer")]) == 2
    assert f"error: {source} is not the input image {out} was made from" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert main(["generate", "--replay", str(plain)]) == 2
    assert f"error: {plain}: no generation record" in capsys.readouterr().err
