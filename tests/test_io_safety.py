"""Checkpoint I/O that never destroys what is there, and loaders that refuse bad files cleanly.

Writing: a save replaces only what the previous save of the same format wrote, keeps the file
mode a user expects, syncs data before the rename, cleans its own stale temp files (and no one
else's), and puts a model saved to a pipeline root where the loader reads it.
Loading: one float dtype per model, bounded refusal of absurd configs, every damaged file named
in a `SanaCheckpointError`, and a warning when a stored config and `config.json` disagree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from node_fixtures import random_dcae, random_dit, tiny_dit_config
from safetensors.torch import load_file, save_file

import sana
from sana import dcae as dcae_module
from sana.checkpoint import open_checkpoint, write_bytes, write_safetensors
from sana.dcae_io import load_dcae, save_dcae
from sana.dit_io import CONFIG_METADATA_KEY, load_dit, save_dit
from sana.errors import SanaCheckpointError, SanaInputError, SanaNonFiniteError
from sana.ops import use_kernels

ROOT = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file modes and signals")


@pytest.fixture(autouse=True)
def torch_route():
    with use_kernels("torch"):
        yield


@pytest.fixture(scope="module")
def dit():
    return random_dit(sana, tiny_dit_config(sana))


@pytest.fixture(scope="module")
def vae():
    return random_dcae(dcae_module)


def dit_inputs(config, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_channels, 4, 4, generator=g)
    return x, torch.tensor([500.0]), torch.randn(1, 5, config.caption_channels, generator=g)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# ============================================================================================
# §3 Writing: never destroy what is there
# ============================================================================================


def test_resaving_a_dit_folder_keeps_the_files_it_did_not_write(tmp_path, dit):
    folder = tmp_path / "transformer"
    folder.mkdir()
    foreign = {
        "diffusion_pytorch_model.fp16.safetensors": b"an fp16 variant from elsewhere",
        "diffusion_pytorch_model.safetensors.bak": b"the user's backup",
        # named like one of our shards, but listed in no index we wrote
        "diffusion_pytorch_model-00009-of-00009.safetensors": b"not ours",
        "README.md": b"notes",
    }
    for name, data in foreign.items():
        (folder / name).write_bytes(data)

    save_dit(dit, folder, max_shard_bytes=20_000)  # sharded
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    assert_same_weights(load_dit(folder), dit)

    save_dit(dit, folder)  # single file: the earlier shards and their index go, nothing else
    assert not any((folder / s).exists() for s in shards)
    assert not (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    for name, data in foreign.items():
        assert (folder / name).read_bytes() == data, name
    assert_same_weights(load_dit(folder), dit)  # the fp16 variant beside it is not read

    save_dit(dit, folder, max_shard_bytes=20_000)  # and back: the single file goes
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    for name, data in foreign.items():
        assert (folder / name).read_bytes() == data, name
    assert_same_weights(load_dit(folder), dit)


def test_resaving_a_dcae_folder_keeps_the_files_it_did_not_write(tmp_path, vae):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"variant")
    (folder / "diffusion_pytorch_model.safetensors.bak").write_bytes(b"backup")
    save_dcae(vae, folder)
    save_dcae(vae, folder)
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").read_bytes() == b"variant"
    assert (folder / "diffusion_pytorch_model.safetensors.bak").read_bytes() == b"backup"
    assert_same_weights(load_dcae(folder), vae)


def test_a_folder_holding_another_model_is_refused(tmp_path, dit, vae):
    save_dcae(vae, tmp_path / "vae")
    before = {p.name: p.read_bytes() for p in (tmp_path / "vae").iterdir()}
    with pytest.raises(SanaCheckpointError, match=r"vae/config\.json: holds a config for AutoencoderDC.*refusing"):
        save_dit(dit, tmp_path / "vae")
    assert {p.name: p.read_bytes() for p in (tmp_path / "vae").iterdir()} == before


@pytest.mark.parametrize("target", ["folder", "model.safetensors", "model.pth"])
def test_non_finite_dit_and_dcae_weights_are_never_saved(tmp_path, dit, vae, target):
    """A NaN/inf weight (a diverged fine-tune, a broken conversion) stops the save before any
    file is written, and a file already at the target keeps its content."""
    import copy

    poisoned_dit, poisoned_vae = copy.deepcopy(dit), copy.deepcopy(vae)
    with torch.no_grad():
        poisoned_dit.blocks[1].attn.qkv.weight[0, 0] = float("nan")
        next(p for p in poisoned_vae.decoder.parameters() if p.dim() > 1).view(-1)[0] = float("inf")
    path = tmp_path / target
    fmt = "official" if target.endswith(".pth") else "diffusers"
    with pytest.raises(SanaNonFiniteError, match=r"the DiT's weight blocks\.1\.attn\.qkv\.weight holds NaN/inf"):
        save_dit(poisoned_dit, path, format=fmt)
    assert not path.exists()
    with pytest.raises(SanaNonFiniteError, match=r"the DC-AE's weight decoder\..* holds NaN/inf"):
        save_dcae(poisoned_vae, path, layout="original" if target != "folder" else None)
    assert not path.exists()
    save_dit(dit, path, format=fmt)
    before = {p: p.read_bytes() for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()}
    with pytest.raises(SanaNonFiniteError):
        save_dit(poisoned_dit, path, format=fmt)
    assert {p: p.read_bytes() for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()} == before


def failing_reads(monkeypatch) -> None:
    """Every read of a weight fails as a disk error or a truncated file does mid-load."""
    from sana.checkpoint import CheckpointReader

    original_read, original_read_into = CheckpointReader.read, CheckpointReader.read_into

    def read(self, key):
        if key.endswith("weight"):
            raise OSError(5, "Input/output error")
        return original_read(self, key)

    def read_into(self, key, out):
        if key.endswith("weight"):
            raise RuntimeError("unexpected end of file")
        return original_read_into(self, key, out)

    monkeypatch.setattr(CheckpointReader, "read", read)
    monkeypatch.setattr(CheckpointReader, "read_into", read_into)


@pytest.mark.parametrize("component", ["dit", "dcae", "controlnet", "w8a8"])
def test_a_read_failing_mid_load_names_the_file(tmp_path, dit, vae, component, monkeypatch):
    from sana.quant import quantize_w8a8, save_w8a8

    path = tmp_path / component
    if component == "dit":
        save_dit(dit, path)
        load = load_dit
    elif component == "dcae":
        save_dcae(vae, path)
        load = load_dcae
    elif component == "controlnet":
        sana.save_controlnet(sana.SanaControlNet.from_dit(dit, blocks=1), path)
        load = sana.load_controlnet
    else:
        path = tmp_path / "w8a8.safetensors"
        import copy

        save_w8a8(quantize_w8a8(copy.deepcopy(dit)), path)
        load = load_dit
    failing_reads(monkeypatch)
    with pytest.raises(SanaCheckpointError, match=rf"{re.escape(str(path))}\S*: failed while reading tensor data: "):
        load(path)


def test_lora_and_w8a8_saves_write_only_their_file(tmp_path, dit):
    from sana.lora import inject_lora, save_lora
    from sana.quant import quantize_w8a8, save_w8a8

    (tmp_path / "lora.safetensors.bak").write_bytes(b"backup")
    adapted = random_dit(sana, tiny_dit_config(sana))
    inject_lora(adapted, rank=2)
    save_lora(adapted, tmp_path / "lora.safetensors")
    save_w8a8(quantize_w8a8(random_dit(sana, tiny_dit_config(sana))), tmp_path / "q.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "lora.safetensors.bak", "q.safetensors"]
    assert (tmp_path / "lora.safetensors.bak").read_bytes() == b"backup"
    with pytest.raises(SanaInputError, match="lora.pt"):
        save_lora(adapted, tmp_path / "lora.pt")  # load_lora would read it as a torch file


@posix_only
def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, dit):
    old_mask = os.umask(0o027)
    try:
        write_bytes(tmp_path / "new.bin", b"x")
        save_dit(dit, tmp_path / "folder")
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        os.chmod(kept, 0o604)
        write_bytes(kept, b"new")
        os.chmod(tmp_path / "folder" / "config.json", 0o644)
        save_dit(dit, tmp_path / "folder")
    finally:
        os.umask(old_mask)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tmp_path / "new.bin") == 0o640  # 0666 & ~027, not mkstemp's 0600
    assert kept.read_bytes() == b"new" and mode(kept) == 0o604
    assert mode(tmp_path / "folder" / "diffusion_pytorch_model.safetensors") == 0o640
    assert mode(tmp_path / "folder" / "config.json") == 0o644


@posix_only
def test_data_is_synced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(3)})
    replaced = [inode for kind, inode in events if kind == "replace"]
    assert len(replaced) == 1
    assert events.index(("fsync", replaced[0])) < events.index(("replace", replaced[0]))


@posix_only
def test_a_save_removes_its_own_stale_temps_and_nothing_else(tmp_path):
    target = tmp_path / "m.safetensors"
    # A save killed by SIGKILL half-way leaves its temp file behind.
    script = (
        "import os, signal, sys, torch\n"
        "import sana.checkpoint as ck\n"
        "def body(f, header, tensors):\n"
        "    f.write(b'x' * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "ck._write_st_body = body\n"
        "ck.write_safetensors(sys.argv[1], {'a': torch.zeros(4)})\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(target)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == -signal.SIGKILL
    (killed,) = [p for p in tmp_path.iterdir()]
    assert re.fullmatch(r"\.m\.safetensors\.\d+\.\w{8}\.tmp", killed.name) and not target.exists()

    dead = dead_pid()
    stale = {killed: 3600, tmp_path / f".m.safetensors.{dead}.abcd1234.tmp": 3600,
             tmp_path / ".m.safetensors.abcd1234.tmp": 2 * 86400}  # pid-less name of earlier versions, days old
    kept = {
        tmp_path / f".m.safetensors.{dead}.fresh123.tmp": 0,  # its writer may be on another machine
        tmp_path / f".m.safetensors.{os.getpid()}.alive123.tmp": 3600,  # a writer still running
        tmp_path / ".m.safetensors.older123.tmp": 3600,  # pid-less, only an hour old
        tmp_path / f".other.safetensors.{dead}.abcd1234.tmp": 3600,  # another target's
        tmp_path / ".m.safetensors.backup.tmp": 3600,  # not our naming
        tmp_path / "m.safetensors.tmp": 3600,
    }
    for path, seconds in {**stale, **kept}.items():
        if not path.exists():
            path.write_bytes(b"partial")
        age(path, seconds)
    write_safetensors(target, {"a": torch.ones(2)})
    assert torch.equal(load_file(target)["a"], torch.ones(2))
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)


@posix_only
def test_a_folder_save_removes_its_own_stale_staging_folders(tmp_path, dit):
    folder = tmp_path / "transformer"
    dead = dead_pid()
    stale, kept = folder / f".saving-{dead}-abcd1234", folder / f".saving-{dead}-fresh123"
    foreign = folder / ".saving-mine"
    for path in (stale, kept, foreign):
        path.mkdir(parents=True)
        (path / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
    for path in (stale, foreign):
        age(path / "diffusion_pytorch_model.safetensors", 3600)
        age(path, 3600)
    save_dit(dit, folder)
    assert not stale.exists() and kept.exists() and foreign.exists()


def test_saving_to_a_pipeline_root_writes_where_the_loader_reads(tmp_path, dit, vae):
    root = tmp_path / "pipeline"
    root.mkdir()
    (root / "model_index.json").write_text('{"_class_name": "SanaPipeline"}')
    save_dit(dit, root)
    save_dcae(vae, root)
    assert (root / "transformer" / "config.json").is_file() and (root / "vae" / "config.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["model_index.json", "transformer", "vae"]
    assert_same_weights(load_dit(root), dit)
    assert_same_weights(load_dcae(root), vae)


def test_a_file_save_onto_a_folder_is_refused_naming_it(tmp_path, dit):
    (tmp_path / "m.pth").mkdir()
    with pytest.raises(SanaCheckpointError, match=r"m\.pth: is a folder"):
        save_dit(dit, tmp_path / "m.pth", format="official")


# ============================================================================================
# §4 Loading
# ============================================================================================


def _mix_dtypes(path: Path, key_part: str) -> str:
    """Rewrite one tensor of the safetensors file `path` in fp16, the rest staying fp32."""
    tensors, metadata = load_file(path), open_checkpoint(path).metadata
    key = next(k for k in tensors if key_part in k and tensors[k].is_floating_point())
    tensors[key] = tensors[key].half()
    save_file(tensors, path, metadata=metadata)
    return key


def test_dit_with_one_tensor_in_another_dtype_loads_in_one_dtype(tmp_path, dit):
    save_dit(dit, tmp_path / "m.safetensors")
    _mix_dtypes(tmp_path / "m.safetensors", "blocks.0.attn1.to_out.0.weight")
    model = load_dit(tmp_path / "m.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        out = model(*dit_inputs(model.config))
        expected = dit(*dit_inputs(model.config))
    # one weight matrix went through fp16 (relative rounding 2^-11) and back
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_w8a8_with_one_float_tensor_in_another_dtype_loads_in_one_dtype(tmp_path):
    from sana.quant import quantize_w8a8, save_w8a8

    quantized = quantize_w8a8(random_dit(sana, tiny_dit_config(sana)))
    save_w8a8(quantized, tmp_path / "q.safetensors")
    tensors = load_file(tmp_path / "q.safetensors")
    metadata = open_checkpoint(tmp_path / "q.safetensors").metadata
    tensors["attention_y_norm.weight"] = tensors["attention_y_norm.weight"].half()
    save_file(tensors, tmp_path / "q.safetensors", metadata=metadata)
    model = load_dit(tmp_path / "q.safetensors")
    floats = {n: t.dtype for n, t in model.state_dict().items() if t.is_floating_point() and not n.endswith("weight_scale")}
    assert set(floats.values()) == {torch.float32}
    assert {t.dtype for n, t in model.state_dict().items() if n.endswith(".weight") and t.dtype == torch.int8}
    with torch.no_grad():
        assert model(*dit_inputs(model.config)).isfinite().all()


def test_dcae_with_one_tensor_in_another_dtype_loads_in_one_dtype(tmp_path, vae):
    save_dcae(vae, tmp_path / "vae.safetensors")
    _mix_dtypes(tmp_path / "vae.safetensors", "decoder.project_out.op_list.2.conv.weight")
    model = load_dcae(tmp_path / "vae.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert model.decode(torch.randn(1, 32, 1, 1)).isfinite().all()


def test_text_encoder_takes_the_dtype_of_most_weights_not_of_the_first(tmp_path):
    from tiny_gemma import build_tiny_gemma

    from sana.text_encoder import load_text_encoder

    folder = build_tiny_gemma(tmp_path / "gemma", intermediate_size=256)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    # embed_tokens (the first tensor, 700×32) in fp16, the larger rest in fp32
    _mix_dtypes(folder / "model.safetensors", "embed_tokens.weight")
    encoder = load_text_encoder(folder)
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float32}
    embeds, _ = encoder.encode(["a cat"], max_length=8)
    assert embeds.dtype == torch.float32 and embeds.isfinite().all()


def _diffusers_dit_folder(tmp_path: Path, dit) -> Path:
    save_dit(dit, tmp_path / "dit")
    return tmp_path / "dit"


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


MAX_MESSAGE = 3000


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"num_layers": 10**6}, "num_layers"),
        ({"num_attention_heads": 2**40}, "num_attention_heads"),
        ({"caption_channels": 10**12}, "caption_channels"),
        ({"num_attention_heads": "x" * 1000, "attention_head_dim": 10**6}, "num_attention_heads"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio"),
    ],
)
def test_absurd_dit_config_json_is_refused_with_a_short_message(tmp_path, dit, changes, named):
    folder = _diffusers_dit_folder(tmp_path, dit)
    for shard in folder.glob("*.safetensors"):  # a bare diffusers folder: config.json is all there is
        save_file(load_file(shard), shard, metadata={"format": "pt"})
    _edit_json(folder / "config.json", **changes)
    with pytest.raises(SanaCheckpointError) as info:
        load_dit(folder)
    message = str(info.value)
    assert "config.json" in message and named in message and len(message) < MAX_MESSAGE


def test_absurd_stored_dit_config_is_refused(tmp_path, dit):
    save_dit(dit, tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    stored = {**dit.config.to_dict(), "depth": 10**6}
    save_file(tensors, tmp_path / "m.safetensors", metadata={CONFIG_METADATA_KEY: json.dumps(stored)})
    with pytest.raises(SanaCheckpointError, match=f"{CONFIG_METADATA_KEY}.*depth") as info:
        load_dit(tmp_path / "m.safetensors")
    assert len(str(info.value)) < MAX_MESSAGE


def test_absurd_config_file_argument_is_refused(tmp_path, dit):
    save_dit(dit, tmp_path / "m.safetensors")
    config_file = tmp_path / "big.json"
    config_file.write_text(json.dumps({**dit.config.to_dict(), "depth": 10**6, "hidden_size": 2**40}))
    with pytest.raises(SanaCheckpointError, match=r"big\.json.*(depth|hidden_size)") as info:
        load_dit(tmp_path / "m.safetensors", config=str(config_file))
    assert len(str(info.value)) < MAX_MESSAGE


def test_config_that_does_not_fit_the_weights_lists_a_bounded_number_of_keys(tmp_path, dit):
    folder = _diffusers_dit_folder(tmp_path, dit)
    for shard in folder.glob("*.safetensors"):
        save_file(load_file(shard), shard, metadata={"format": "pt"})
    _edit_json(folder / "config.json", num_layers=1000)  # in bounds, but 998 blocks are missing
    with pytest.raises(SanaCheckpointError, match=r"missing keys \(\d+\): \[.*\] and \d+ more") as info:
        load_dit(folder)
    assert len(str(info.value)) < MAX_MESSAGE


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"encoder_layers_per_block": [10**6] * 6}, "encoder_layers_per_block"),
        ({"decoder_block_out_channels": [2**40] * 6}, "decoder_block_out_channels"),
        ({"encoder_block_out_channels": [8] * 10**5}, "encoder_block_out_channels"),
        ({"encoder_block_types": "x" * 10**6}, "encoder_block_types"),
    ],
)
def test_absurd_dcae_config_json_is_refused_with_a_short_message(tmp_path, vae, changes, named):
    save_dcae(vae, tmp_path / "vae")
    _edit_json(tmp_path / "vae" / "config.json", **changes)
    with pytest.raises(SanaCheckpointError) as info:
        load_dcae(tmp_path / "vae")
    message = str(info.value)
    assert "config.json" in message and named in message and len(message) < MAX_MESSAGE


def test_dcae_with_an_absurd_stage_index_is_refused(tmp_path, vae):
    save_dcae(vae, tmp_path / "vae.safetensors", layout="diffusers")
    tensors = load_file(tmp_path / "vae.safetensors")
    tensors["encoder.down_blocks.999999999.0.conv1.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "vae.safetensors")  # no stored config: the stages are inferred
    with pytest.raises(SanaCheckpointError, match="at most 12 stages"):
        load_dcae(tmp_path / "vae.safetensors")


# --------------------------------------------------------------------------------------------
# A damaged Gemma folder


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from tiny_gemma import build_tiny_gemma

    return build_tiny_gemma(tmp_path_factory.mktemp("gemma") / "gemma")


def _damaged_gemma(gemma: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(gemma, tmp_path / "damaged"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


GEMMA_DAMAGE = {
    "tokenizer.json": lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": {'),
    "tokenizer_config.json": lambda f: (f / "tokenizer_config.json").write_bytes(b"\xff\xfe not utf-8"),
    "model.safetensors": lambda f: _truncate(f / "model.safetensors"),
    "config.json": lambda f: (f / "config.json").write_text("[1, 2"),
    "model.safetensors.index.json": lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
}


@pytest.mark.parametrize("damaged", sorted(GEMMA_DAMAGE))
def test_damaged_gemma_file_is_named(gemma, tmp_path, damaged):
    from sana.text_encoder import load_text_encoder

    folder = _damaged_gemma(gemma, tmp_path)
    GEMMA_DAMAGE[damaged](folder)
    with pytest.raises(SanaCheckpointError, match=re.escape(damaged)):
        load_text_encoder(folder)


def test_gemma_config_that_does_not_fit_the_weights_is_refused_before_building(gemma, tmp_path):
    from sana.text_encoder import load_text_encoder

    folder = _damaged_gemma(gemma, tmp_path)
    _edit_json(folder / "config.json", num_hidden_layers=1000)
    with pytest.raises(SanaCheckpointError, match="config.json describes 1000 layers"):
        load_text_encoder(folder)


# --------------------------------------------------------------------------------------------
# A stored config and config.json that disagree


def test_dit_stored_config_and_config_json_conflict_is_reported(tmp_path, dit):
    folder = _diffusers_dit_folder(tmp_path, dit)
    _edit_json(folder / "config.json", sample_size=64)
    with pytest.warns(UserWarning) as record:
        model = load_dit(folder)
    message = " ".join(str(w.message) for w in record)
    assert CONFIG_METADATA_KEY in message and str(folder / "config.json") in message
    assert "sample_size: 32 vs 64" in message and "using the one stored in the weights" in message
    assert model.config.sample_size == dit.config.sample_size == 32


def test_dit_stored_config_and_matching_config_json_load_silently(tmp_path, dit):
    folder = _diffusers_dit_folder(tmp_path, dit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dit(folder)


def test_dit_unusable_config_json_beside_a_stored_config_is_reported_not_fatal(tmp_path, dit):
    folder = _diffusers_dit_folder(tmp_path, dit)
    _edit_json(folder / "config.json", num_layers=10**6)
    with pytest.warns(UserWarning, match=r"config\.json: values out of range.*num_layers.*using the config stored in the weights"):
        model = load_dit(folder)
    assert_same_weights(model, dit)


def test_dcae_stored_config_and_config_json_conflict_is_reported(tmp_path, vae):
    save_dcae(vae, tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    stored = vae.config.replace(scaling_factor=0.5)
    save_file(load_file(weights), weights, metadata={"dcae_config": stored.to_json()})
    with pytest.warns(UserWarning, match=r"dcae_config.*config\.json disagree.*scaling_factor: 0\.5 vs"):
        model = load_dcae(tmp_path / "vae")
    assert model.config.scaling_factor == 0.5


# --------------------------------------------------------------------------------------------
# Raw exceptions from bad files become SanaCheckpointError naming the file


def _bad_utf8_config(folder: Path) -> str:
    (folder / "config.json").write_bytes(b'{"num_layers": "\xff"}')
    return "config.json"


def _index_without_map(folder: Path) -> str:
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    return "index.json"


def _index_escaping_the_folder(folder: Path) -> str:
    weights = folder / "diffusion_pytorch_model.safetensors"
    keys = list(load_file(weights))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "../../diffusion_pytorch_model.safetensors" for k in keys}})
    )
    return "plain file names"


def _metadata_not_strings(folder: Path) -> str:
    weights = folder / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    (n,) = __import__("struct").unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = {CONFIG_METADATA_KEY: {"depth": 2}}
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    weights.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    return "__metadata__"


def _corrupt_stored_config(folder: Path) -> str:
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file(load_file(weights), weights, metadata={CONFIG_METADATA_KEY: "{not json"})
    return CONFIG_METADATA_KEY


@pytest.mark.parametrize(
    "damage", [_bad_utf8_config, _index_without_map, _index_escaping_the_folder, _metadata_not_strings, _corrupt_stored_config]
)
def test_damaged_dit_folder_is_named(tmp_path, dit, damage):
    folder = _diffusers_dit_folder(tmp_path, dit)
    expected = damage(folder)
    with pytest.raises(SanaCheckpointError, match=re.escape(expected)) as info:
        load_dit(folder)
    assert str(folder) in str(info.value)


def test_damaged_config_file_argument_is_named(tmp_path, dit):
    save_dit(dit, tmp_path / "m.safetensors")
    (tmp_path / "c.json").write_text("{oops")
    with pytest.raises(SanaCheckpointError, match=r"c\.json"):
        load_dit(tmp_path / "m.safetensors", config=str(tmp_path / "c.json"))


def test_damaged_lora_metadata_is_named(tmp_path, dit):
    from sana.lora import METADATA_KEY, inject_lora, load_lora, save_lora

    adapted = random_dit(sana, tiny_dit_config(sana))
    inject_lora(adapted, rank=2)
    save_lora(adapted, tmp_path / "lora.safetensors")
    save_file(load_file(tmp_path / "lora.safetensors"), tmp_path / "lora.safetensors", metadata={METADATA_KEY: "{oops"})
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with pytest.raises(SanaCheckpointError, match=rf"lora\.safetensors.*{METADATA_KEY}"):
        load_lora(dit, tmp_path / "lora.safetensors")
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())


def test_damaged_w8a8_metadata_is_named(tmp_path):
    from sana.quant import quantize_w8a8, save_w8a8
    from sana.quant.checkpoint import W8A8_METADATA_KEY

    save_w8a8(quantize_w8a8(random_dit(sana, tiny_dit_config(sana))), tmp_path / "q.safetensors")
    metadata = dict(open_checkpoint(tmp_path / "q.safetensors").metadata)
    metadata[W8A8_METADATA_KEY] = json.dumps({"version": 1, "layers": ["blocks.0.attn.qkv"]})
    save_file(load_file(tmp_path / "q.safetensors"), tmp_path / "q.safetensors", metadata=metadata)
    with pytest.raises(SanaCheckpointError, match=rf"q\.safetensors.*corrupt '{W8A8_METADATA_KEY}'"):
        load_dit(tmp_path / "q.safetensors")


def test_nothing_in_sana_unpickles_untrusted_data():
    calls, offenders = 0, []
    for path in (ROOT / "sana").rglob("*.py"):
        text = path.read_text()
        if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(", text):
            offenders.append(str(path))
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            calls += 1
            if "weights_only=True" not in call:
                offenders.append(f"{path}: {call}")
    assert calls and not offenders
