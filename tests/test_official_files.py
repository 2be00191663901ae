"""Official files exactly as they are downloaded or written by their own tools, loaded as they are.

- The DC-AE release folder `mit-han-lab/dc-ae-*` in the original layout: `model.safetensors`
  and the `config.json` that huggingface_hub's `PyTorchModelHubMixin` writes for efficientvit's
  `DCAE_HF` (only `{"model_name": ...}`), written here by that mixin.
- Checkpoints of NVlabs' training code: `save_checkpoint_ddp` (diffusion/utils/checkpoint.py)
  writes `epoch_{e}_step_{s}.pth` holding `state_dict`, `state_dict_ema`, the optimizer and
  scheduler state, `epoch` and `rng_state` (torch, CUDA, NumPy, Python and generator states),
  and links `latest.pth` to it. NumPy's state is pickled through NumPy's own globals, under
  `numpy._core` (NumPy 2) or `numpy.core` (NumPy 1), both written here.
- Sharded official safetensors as huggingface_hub's `save_torch_state_dict` writes them, given as
  their `*.safetensors.index.json` (NVlabs' `tools/download.py::find_model` reads that path).

Each is compared with the second form of the same weights (a diffusers folder, the released
`{"state_dict": ...}` .pth, one unsharded file): the tensors are the same bytes, so the loaded
models must be identical; the DC-AE is also checked against diffusers' `AutoencoderDC`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sana
from dit_checkpoints import official_state_dict, random_reference, write_official_pth, write_official_safetensors
from node_fixtures import ext_module
from sana.checkpoint import CheckpointReader, TensorInfo
from sana.dcae import DCAE_PRESETS
from sana.dcae_io import file_shapes, load_dcae, resolve_config, state_in_layout
from sana.dit_io import config_from_diffusers
from sana.errors import SanaCheckpointError
from test_dcae import RTOL, reference, rel_err

huggingface_hub = pytest.importorskip("huggingface_hub")

torch.set_num_threads(2)
loaders = ext_module("nodes.loaders")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same bytes loaded through two containers: every tensor identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- DC-AE release folder


class _StateModule(nn.Module):
    """A module whose state dict is `state` under its dotted names, as efficientvit's `DCAE` is."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in state.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_buffer(leaf, tensor.clone())


def write_release_folder(folder: Path, model_name: str, state: dict[str, torch.Tensor]) -> Path:
    """What `DCAE_HF(model_name).save_pretrained(folder)` writes (efficientvit's ae_model_zoo.py),
    through the same huggingface_hub mixin, for weights `state` in the original layout."""

    class DCAE_HF(_StateModule, huggingface_hub.PyTorchModelHubMixin):
        def __init__(self, model_name: str):
            super().__init__(state)

    DCAE_HF(model_name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_releases(tmp_path_factory):
    """{layout: (diffusers reference, its diffusers folder, its weights in the original layout)}
    for reduced-width copies of the SANA and in/mix layouts."""
    root = tmp_path_factory.mktemp("dcae")
    out = {}
    for layout, seed in (("sana", 3), ("inmix", 4)):
        ref = reference(layout, seed)
        ref.save_pretrained(root / layout)
        out[layout] = ref, root / layout, state_in_layout(load_dcae(root / layout), "original")
    return out


def test_release_folder_as_downloaded_loads(tmp_path, small_releases):
    """`load_dcae(folder)` read the hub `config.json` as a diffusers config ("missing keys (100)")."""
    ref, diffusers_folder, original = small_releases["sana"]
    folder = write_release_folder(tmp_path / "dc-ae-f32c32-sana-1.1", "dc-ae-f32c32-sana-1.1", original)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "config.json").read_text().split() == ["{", '"model_name":', '"dc-ae-f32c32-sana-1.1"', "}"]
    # These weights are a reduced-width copy, not the release's architecture: said, and loaded.
    with pytest.warns(UserWarning, match="names the release dc-ae-f32c32-sana-1.1, but the weights have another"):
        loaded = load_dcae(folder)
    from_diffusers = load_dcae(diffusers_folder)
    assert_same_weights(loaded, from_diffusers)
    assert loaded.config.replace(name="") == from_diffusers.config.replace(name="")
    assert loaded.scaling_factor == 0.41407
    latents = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert rel_err(loaded.decode(latents), ref.decode(latents).sample) <= RTOL


@pytest.mark.parametrize("release, scaling_factor", [("dc-ae-f32c32-in-1.0", 0.3189), ("dc-ae-f32c32-mix-1.0", 0.4552)])
def test_model_name_settles_in_or_mix(tmp_path, small_releases, monkeypatch, release, scaling_factor):
    """With the release architectures at reduced width (as an efficientvit registry patched for a
    test would write them), the folder loads as exactly the release its `model_name` names."""
    ref, diffusers_folder, original = small_releases["inmix"]
    small = load_dcae(diffusers_folder).config
    for name in ("dc-ae-f32c32-in-1.0", "dc-ae-f32c32-mix-1.0"):
        monkeypatch.setitem(DCAE_PRESETS, name, small.replace(name=name, scaling_factor=DCAE_PRESETS[name].scaling_factor))
    # The folder name says the other release: the hub config, written with the weights, wins.
    other = "mix" if "-in-" in release else "in"
    folder = write_release_folder(tmp_path / f"dc-ae-f32c32-{other}-1.0", release, original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_dcae(folder)
    assert loaded.config == DCAE_PRESETS[release] and loaded.scaling_factor == scaling_factor
    assert_same_weights(loaded, load_dcae(diffusers_folder))


@pytest.mark.parametrize("release", sorted(DCAE_PRESETS))
def test_every_release_name_in_a_hub_config_is_read(release):
    """At the releases' own shapes, `model_name` gives the release (sana-1.0 vs 1.1, in vs mix)
    whatever the path says, with no warning."""
    shapes = file_shapes(DCAE_PRESETS[release], "original")
    infos = {k: TensorInfo(s, torch.float32) for k, s in shapes.items()}
    for folder in ("/m/vae", "/m/dc-ae-f32c32-mix-1.0" if "-in-" in release else "/m/dc-ae-f32c32-in-1.0"):
        reader = CheckpointReader(Path(folder), "folder", infos, lambda k: None, {"model_name": release})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_config(reader, "original") == DCAE_PRESETS[release]


def test_the_dcae_loader_lists_the_release_folder(tmp_path, small_releases):
    _, _, original = small_releases["sana"]
    root = tmp_path / "vae"
    write_release_folder(root / "dc-ae-f32c32-sana-1.1", "dc-ae-f32c32-sana-1.1", original)
    names = loaders.list_model_entries([root], {".safetensors", ".pth"}, lambda p: loaders.has_config(p, "vae"))
    assert names == ["dc-ae-f32c32-sana-1.1"]


# --------------------------------------------------------------------------- NVlabs training checkpoints


class _NumPy1Pickler(pickle._Pickler):
    """Pickles NumPy arrays the way NumPy 1.x does: through `numpy.core.multiarray._reconstruct`."""

    def save_global(self, obj, name=None):
        if obj is np._core.multiarray._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


NUMPY1_PICKLE = types.ModuleType("numpy1_pickle")
NUMPY1_PICKLE.Pickler, NUMPY1_PICKLE.Unpickler = _NumPy1Pickler, pickle.Unpickler


def write_training_checkpoint(work_dir: Path, model_state: dict, ema_state: dict, *, epoch: int, step: int,
                              pickle_module=pickle) -> Path:
    """What NVlabs' `save_checkpoint_ddp(work_dir, epoch, model, model_ema, optimizer, lr_scheduler,
    generator, step=step, add_symlink=True)` writes, for a model whose state dict is `model_state`."""
    params = [nn.Parameter(t.clone()) for t in model_state.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.03)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 500))  # warmup
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    lr_scheduler.step()
    generator = torch.Generator(device="cpu").manual_seed(42)

    work_dir.mkdir(parents=True, exist_ok=True)
    state_dict = dict(state_dict=model_state)
    state_dict["state_dict_ema"] = ema_state
    state_dict["optimizer"] = optimizer.state_dict()
    state_dict["scheduler"] = lr_scheduler.state_dict()
    state_dict["epoch"] = epoch
    file_path = work_dir / f"epoch_{epoch}_step_{step}.pth"
    state_dict["rng_state"] = {
        "torch": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
    }
    torch.save(state_dict, file_path, pickle_module=pickle_module)
    link = work_dir / "latest.pth"
    if link.exists() or link.is_symlink():
        link.unlink()
    os.symlink(os.path.abspath(file_path), link)
    return file_path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, EMA) diffusers references and a training checkpoint of them."""
    root = tmp_path_factory.mktemp("train")
    model, ema = random_reference("sana", seed=5), random_reference("sana", seed=6)
    path = write_training_checkpoint(root / "checkpoints", official_state_dict(model), official_state_dict(ema),
                                     epoch=2, step=100)
    return model, ema, path


def load_tiny_dit(path: Path, **kwargs) -> sana.SanaDiT:
    """A tiny DiT's width is no release's, so its heads come from the reference's config."""
    return sana.load_dit(path, config=config_from_diffusers(dict(random_reference("sana").config)), **kwargs)


def test_training_checkpoint_loads_state_dict_as_nvlabs_inference(tmp_path, trained):
    """`torch.load(weights_only=True)` refused these files (`numpy._core.multiarray._reconstruct`)."""
    model, ema, path = trained
    assert "numpy" in "".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # the file holds them
    released = load_tiny_dit(write_official_pth(model, tmp_path / "released.pth"))
    assert_same_weights(load_tiny_dit(path), released)
    assert_same_weights(load_tiny_dit(path.parent / "latest.pth"), released)
    from_ema = load_tiny_dit(path, ema=True)
    assert_same_weights(from_ema, load_tiny_dit(write_official_pth(ema, tmp_path / "ema.pth")))
    assert not torch.equal(from_ema.blocks[0].attn.qkv.weight, released.blocks[0].attn.qkv.weight)


def test_convert_takes_the_ema_weights_into_a_file_comfyui_loads(tmp_path, trained, capsys):
    """`python -m sana convert dit latest.pth ema.safetensors --ema`: the EMA weights as a file the
    DiT Loader node reads (it loads a training checkpoint's state_dict, as NVlabs' inference does)."""
    from sana.cli import main

    _, ema, path = trained
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(random_reference("sana").config)))
    assert main(["convert", "dit", str(path.parent / "latest.pth"), str(tmp_path / "ema.safetensors"), "--ema",
                 "--config", str(config)]) == 0
    assert_same_weights(load_tiny_dit(tmp_path / "ema.safetensors"),
                        load_tiny_dit(write_official_pth(ema, tmp_path / "ema.pth")))
    capsys.readouterr()
    assert main(["convert", "vae", str(tmp_path / "ema.pth"), str(tmp_path / "x"), "--ema"]) == 2
    assert "--ema picks a DiT training checkpoint's EMA weights" in capsys.readouterr().err


def test_training_checkpoint_from_numpy_1_loads(tmp_path, trained):
    model, ema, _ = trained
    path = write_training_checkpoint(tmp_path, official_state_dict(model), official_state_dict(ema), epoch=1,
                                     step=7, pickle_module=NUMPY1_PICKLE)
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert_same_weights(load_tiny_dit(path), load_tiny_dit(write_official_pth(model, tmp_path / "released.pth")))


class _TouchOnLoad:
    """An object whose unpickling would create `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_any_other_global_is_refused_and_nothing_runs(tmp_path, trained):
    model, _, _ = trained
    marker = tmp_path / "ran"
    torch.save({"state_dict": official_state_dict(model), "hook": _TouchOnLoad(marker)}, tmp_path / "evil.pth")
    with pytest.raises(SanaCheckpointError, match=r"evil\.pth: refused: .*'io\.open'"):
        load_tiny_dit(tmp_path / "evil.pth")
    assert not marker.exists()
    # A NumPy scalar is NumPy too, but no part of NumPy's RNG state: refused as well.
    torch.save({"state_dict": official_state_dict(model), "loss": np.float64(0.5)}, tmp_path / "scalar.pth")
    with pytest.raises(SanaCheckpointError, match=r"scalar\.pth: refused: .*multiarray\.scalar"):
        load_tiny_dit(tmp_path / "scalar.pth")


def test_ema_weights_must_be_there(tmp_path, trained):
    model, _, _ = trained
    released = write_official_pth(model, tmp_path / "released.pth")
    with pytest.raises(SanaCheckpointError, match=r"released\.pth: has no 'state_dict_ema' entry"):
        load_tiny_dit(released, ema=True)
    single = write_official_safetensors(model, tmp_path / "single.safetensors")
    with pytest.raises(SanaCheckpointError, match=r"single\.safetensors: holds one set of weights"):
        load_tiny_dit(single, ema=True)


# --------------------------------------------------------------------------- sharded safetensors


def test_sharded_official_safetensors_by_their_index(tmp_path):
    """`load_dit("….safetensors.index.json")` was an "unknown checkpoint format"."""
    model = random_reference("sana", seed=8)
    folder = tmp_path / "Sana_sharded"
    folder.mkdir()
    huggingface_hub.save_torch_state_dict(official_state_dict(model), folder, max_shard_size=20_000)
    index = folder / "model.safetensors.index.json"
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    single = load_tiny_dit(write_official_safetensors(model, tmp_path / "single.safetensors"))
    assert_same_weights(load_tiny_dit(index), single)
    assert_same_weights(load_tiny_dit(folder), single)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(SanaCheckpointError, match=r"model\.safetensors\.index\.json: shard files are missing"):
        load_tiny_dit(index)


def test_the_dit_loader_lists_an_index_in_place_of_its_shards(tmp_path):
    """Each shard was listed as a model of its own, and the index not at all."""
    folder = tmp_path / "Sana_sharded"
    folder.mkdir()
    huggingface_hub.save_torch_state_dict(official_state_dict(random_reference("sana")), folder, max_shard_size=20_000)
    (folder / "notes.txt").write_text("x")
    (tmp_path / "single.safetensors").write_bytes(b"x")
    names = loaders.list_model_entries([tmp_path], {".safetensors", ".pth"}, lambda p: loaders.has_config(p, "transformer"))
    assert names == ["Sana_sharded/model.safetensors.index.json", "single.safetensors"]


def test_index_of_a_diffusers_folder_reads_its_config(tmp_path):
    model = load_tiny_dit(write_official_pth(random_reference("sana", seed=9), tmp_path / "sana.pth"))
    sana.save_dit(model, tmp_path / "transformer", max_shard_bytes=20_000)
    index = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    loaded = sana.load_dit(index)
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
