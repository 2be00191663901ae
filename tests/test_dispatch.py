"""The kernel dispatcher (`sana.kernels.dispatch`): a kernel runs only where it matched its
reference and timed faster; any failure sends it to its reference with one warning; timing
choices persist on disk per device and versions.

Most tests run the `auto` rules on the CPU (the `isolated(auto_device_types={"cpu"})` hook) with
injected kernels that fail to compile, fail at launch, return wrong numbers or run slower, and a
stub timer (no clock in any assertion). A generation through such kernels must equal the
reference path's exactly: every call the kernel does not serve runs the very reference code.
The real kernels' probes run under Triton's interpreter (or compiled, on a GPU).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

import sana
from node_fixtures import random_dcae, random_dit, tiny_dit_config
from sana import dcae, dit
from sana.kernels import choice_cache, dispatch
from sana.ops import use_kernels
from tiny_gemma import build_tiny_gemma

MODEL_KERNELS = {
    "relu_linear_attention": dit.relu_linear_attention,
    "rms_norm": dit.rms_norm,
    "layer_norm_modulate": dit.layer_norm_modulate,
    "residual_layer_norm_modulate": dit.residual_layer_norm_modulate,
    "depthwise_conv_glu": dit.depthwise_conv_glu,
    "relu_linear_attention_multiscale": dcae.relu_linear_attention_multiscale,
    "rms_norm_2d": dcae.rms_norm_2d,
}


def perturbed(out):
    """A wrong answer of the same shape and dtype."""
    if isinstance(out, tuple):
        return (out[0], out[1] * 1.01 + 0.01)
    return out * 1.01 + 0.01


class FakeKernel:
    """A stand-in for a Triton kernel: the reference's answer, or a failure, per `mode`.

    compile: the kernel module fails to import/compile; probe: every launch fails (so the probe
    does); launch: the probe's launch succeeds, any other shape fails; wrong: a perturbed answer;
    right: the reference's own answer (so a run through it equals the reference run).
    """

    def __init__(self, name: str, mode: str, log: list):
        self.name, self.mode, self.log = name, mode, log
        self.reference = MODEL_KERNELS[name].reference
        self.first_shape = None

    def load(self):
        if self.mode == "compile":
            raise RuntimeError(f"CompilationError: {self.name} (injected)")
        return self

    def __call__(self, *args, **kwargs):
        self.log.append(self.name)
        shape = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).shape
        self.first_shape = self.first_shape or shape
        if self.mode == "probe" or (self.mode == "launch" and shape != self.first_shape):
            raise RuntimeError(f"CUDA error: too many resources requested for launch ({self.name}, injected)")
        out = self.reference(*args, **kwargs)
        return perturbed(out) if self.mode == "wrong" else out


def inject(mode: str, log: list, names=MODEL_KERNELS) -> None:
    """Replace the kernels `names` (inside an isolated dispatcher) by `FakeKernel`s."""
    for name in names:
        fake = FakeKernel(name, mode, log)
        dispatch.register(dataclasses.replace(dispatch.spec(name), load=fake.load, needs_triton=False))


class StubTimer:
    """A timer that runs nothing twice: the kernel side (calls land in the fake's log) costs
    `kernel_s`, the reference side 1.0."""

    def __init__(self, log: list, kernel_s: float):
        self.log, self.kernel_s, self.calls = log, kernel_s, 0

    def __call__(self, run, device) -> float:
        self.calls += 1
        before = len(self.log)
        run()
        return self.kernel_s if len(self.log) > before else 1.0


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(choice_cache.CACHE_ENV, str(folder))
    return folder


def fallback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sana" and "falls back" in r.getMessage()]


# --------------------------------------------------------------------------------------------
# A whole generation through failing kernels equals the reference path's


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = build_tiny_gemma(tmp_path_factory.mktemp("dispatch_gemma"), hidden_size=32)
    text_encoder = sana.load_text_encoder(folder, attn_implementation="eager")
    model = random_dit(sana, dataclasses.replace(tiny_dit_config(sana), qk_norm=True))  # rms_norm runs too
    return dict(dit=model, dcae=random_dcae(dcae), text_encoder=text_encoder)


def generation(parts) -> torch.Tensor:
    return sana.generate(**parts, prompt="a cat", height=64, width=64, steps=2, seed=3, resolution_binning=False,
                         guidance_scale=4.5, solver="flow_dpm_solver")


@pytest.fixture(scope="module")
def reference_images(parts):
    with use_kernels("torch"):
        return generation(parts)


@pytest.mark.parametrize("mode", ["compile", "probe", "launch", "wrong"])
def test_failing_kernels_fall_back_and_the_images_equal_the_reference(parts, reference_images, mode, cache_dir, caplog):
    log = []
    with dispatch.isolated(auto_device_types={"cpu"}, timer=StubTimer(log, kernel_s=0.5)), use_kernels("auto"):
        inject(mode, log)
        caplog.set_level(logging.WARNING, logger="sana")
        images = generation(parts)
        verdicts = [(k["name"], p) for k in dispatch.report()["kernels"] for p in k["probes"]]
    assert torch.equal(images, reference_images)
    assert verdicts and all(p["status"] == "failed" for _, p in verdicts), [(n, p["status"], p["variant"]) for n, p in verdicts]
    messages = fallback_warnings(caplog)
    warned = [m.split()[2] for m in messages]
    assert sorted(warned) == sorted(MODEL_KERNELS)  # one line per kernel (the generation uses all), on its device
    cause = {"compile": "CompilationError", "probe": "too many resources", "launch": "too many resources",
             "wrong": "differs from the reference"}[mode]
    assert all(cause in m and " on cpu " in m for m in messages), messages
    # After its fallback a kernel is never launched again: the probe (and in "launch" mode the
    # one failed launch at the real shape) is all it ever ran.
    assert len(log) <= 3 * len(verdicts)


def test_slower_kernels_are_not_used_and_faster_ones_are(parts, reference_images, cache_dir, caplog):
    caplog.set_level(logging.WARNING, logger="sana")
    for kernel_s, used in ((2.0, False), (0.5, True)):
        log = []
        timer = StubTimer(log, kernel_s)
        with dispatch.isolated(auto_device_types={"cpu"}, timer=timer), use_kernels("auto"):
            inject("right", log)
            images = generation(parts)
            kernels = dispatch.report()["kernels"]
        assert torch.equal(images, reference_images)  # the fakes return the reference's answer
        assert fallback_warnings(caplog) == []
        choices = [c for k in kernels for c in k["choices"]]
        assert choices and all(c["choice"] == ("kernel" if used else "reference") for c in choices)
        assert timer.calls == 2 * len(choices)  # once per shape class, both sides
        # Kernel launches outside real calls: one per probe (two with the gradient check) and two
        # per timing (the does-it-take-these-inputs call and the timed one).
        probing_and_timing = sum(len(k["probes"]) * (1 + k["differentiable"]) for k in kernels) + 2 * len(choices)
        assert len(log) == probing_and_timing if not used else len(log) > probing_and_timing
        for f in cache_dir.iterdir():  # the next run starts without the saved choices
            f.unlink()


# --------------------------------------------------------------------------------------------
# Single calls: fallbacks, rules, timing


def rms_norm_inputs(tokens: int = 37):
    g = torch.Generator().manual_seed(tokens)
    return torch.randn(2, tokens, 96, generator=g), torch.randn(96, generator=g), 1e-6


def test_a_launch_error_at_a_real_shape_falls_back_once(cache_dir, caplog):
    caplog.set_level(logging.WARNING, logger="sana")
    failing, calls = [False], []

    def kernel(x, weight, eps):
        calls.append(x.shape)
        if failing[0]:
            raise RuntimeError("CUDA error: an illegal instruction was encountered (injected)")
        return dit.rms_norm.reference(x, weight, eps)

    with dispatch.isolated(auto_device_types={"cpu"}, timer=StubTimer(calls, kernel_s=0.5)), use_kernels("auto"):
        dispatch.register(dataclasses.replace(dispatch.spec("rms_norm"), load=lambda: kernel, needs_triton=False))
        x, w, eps = rms_norm_inputs(300)
        dit.rms_norm(x, w, eps)  # probed, timed, chosen
        failing[0] = True
        before = len(calls)
        for _ in range(3):
            out = dit.rms_norm(x, w, eps)
        assert torch.equal(out, dit.rms_norm.reference(x, w, eps))
    assert len(calls) == before + 1  # one failed launch, then the reference only
    [message] = fallback_warnings(caplog)
    for part in ("rms_norm", "cpu", "float32", "illegal instruction", "[2, 300, 96]"):
        assert part in message, message


def test_out_of_memory_in_a_kernel_is_raised_not_blamed(cache_dir):
    calls = []

    def kernel(x, weight, eps):
        calls.append(x.shape)
        if x.shape[1] == 300:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return dit.rms_norm.reference(x, weight, eps)

    with dispatch.isolated(auto_device_types={"cpu"}, timer=StubTimer(calls, kernel_s=0.5)), use_kernels("auto"):
        dispatch.register(dataclasses.replace(dispatch.spec("rms_norm"), load=lambda: kernel, needs_triton=False))
        dit.rms_norm(*rms_norm_inputs(37))
        with pytest.raises(torch.OutOfMemoryError):  # for the caller to free memory and retry
            dit.rms_norm(*rms_norm_inputs(300))
        [entry] = [k for k in dispatch.report()["kernels"] if k["name"] == "rms_norm"]
    assert [p["status"] for p in entry["probes"]] == ["passed"]  # not the kernel's fault
    assert sorted(c.get("note", "") for c in entry["choices"]) == ["", "not timed: out of memory"]


def test_compiled_graphs_gradients_and_devices_without_triton_take_the_reference(cache_dir):
    log = []
    with dispatch.isolated(auto_device_types={"cpu"}, timer=StubTimer(log, kernel_s=0.5)), use_kernels("auto"):
        inject("right", log, ["rms_norm"])
        x, w, eps = rms_norm_inputs()
        torch.compile(lambda a: dit.rms_norm(a, w, eps), backend="eager", fullgraph=True)(x)
        with torch.enable_grad():  # a forward-only kernel while autograd wants gradients
            dit.rms_norm(x, w.clone().requires_grad_(True), eps)
        assert log == [] and dispatch.report()["devices"] == {}  # nothing probed
    with dispatch.isolated(timer=StubTimer(log, kernel_s=0.5)), use_kernels("auto"):  # the default device types
        inject("right", log, ["rms_norm"])
        dit.rms_norm(*rms_norm_inputs())  # CPU
        dit.rms_norm(*(t.to("meta") if isinstance(t, torch.Tensor) else t for t in rms_norm_inputs()))
        assert log == []
    assert dispatch.AUTO_DEVICE_TYPES == {"cuda", "xpu"}  # no MPS or CPU kernels under auto


def test_each_variant_gets_its_own_probe(cache_dir):
    log = []
    with dispatch.isolated(auto_device_types={"cpu"}, timer=StubTimer(log, kernel_s=0.5)), use_kernels("auto"):
        inject("right", log, ["rms_norm_2d"])
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(1, 8, 4, 4, generator=g), torch.ones(8), torch.zeros(8)
        for args in ((x, w, b, 1e-5), (x, w, b, 1e-5, x), (x.to(torch.bfloat16), w, b, 1e-5),
                     (x.contiguous(memory_format=torch.channels_last), w, b, 1e-5)):
            dcae.rms_norm_2d(*args)
            dcae.rms_norm_2d(*args)
        probes = [p["variant"] for k in dispatch.report()["kernels"] for p in k["probes"]]
    assert len(probes) == 4 and any("channels-last" in p for p in probes) and any("bfloat16" in p for p in probes)


# --------------------------------------------------------------------------------------------
# The real kernels pass their probes


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_real_kernel_passes_its_probe(dtype):
    pytest.importorskip("triton")
    with dispatch.isolated():
        names = dispatch.kernel_names()
        verdicts = {name: dispatch.probe(name, DEVICE, dtype) for name in names}
    assert set(names) >= set(MODEL_KERNELS) | {"int8_linear", "quantize_rows", "depthwise_conv_glu_quantize",
                                                "layernorm_modulate_quantize"}
    assert {n: v.status for n, v in verdicts.items()} == dict.fromkeys(names, dispatch.PASSED), verdicts


def test_a_real_kernel_that_wins_its_timing_serves_the_calls(cache_dir):
    pytest.importorskip("triton")
    log = []
    real = dispatch.spec("rms_norm")

    def load():
        kernel = real.load()
        return lambda *a, **k: log.append("rms_norm") or kernel(*a, **k)

    x, w, eps = rms_norm_inputs()
    with dispatch.isolated(auto_device_types={"cpu"}, timer=StubTimer(log, kernel_s=0.5)), use_kernels("auto"):
        dispatch.register(dataclasses.replace(real, load=load))
        outputs = [dit.rms_norm(x, w, eps) for _ in range(2)]
        [entry] = [k for k in dispatch.report()["kernels"] if k["name"] == "rms_norm"]
    assert [p["status"] for p in entry["probes"]] == ["passed"]
    assert [c["choice"] for c in entry["choices"]] == ["kernel"]
    assert len(log) == 1 + 2 + 2  # probe, timing, two real calls
    for out in outputs:  # the Triton kernel's answer: fp32 sums in another order
        torch.testing.assert_close(out, dit.rms_norm.reference(x, w, eps), rtol=1e-5, atol=1e-6)


def test_a_mismatch_warning_names_kernel_device_dtype_and_cause(cache_dir, caplog):
    log = []
    caplog.set_level(logging.WARNING, logger="sana")
    with dispatch.isolated(auto_device_types={"cpu"}), use_kernels("auto"):
        inject("wrong", log, ["layer_norm_modulate"])
        x = torch.randn(1, 5, 16, dtype=torch.bfloat16)
        shift = scale = torch.zeros(1, 1, 16, dtype=torch.bfloat16)
        for _ in range(3):
            out = dit.layer_norm_modulate(x, shift, scale, 1e-6)
    assert torch.equal(out, dit.layer_norm_modulate.reference(x, shift, scale, 1e-6))
    [message] = fallback_warnings(caplog)
    for part in ("layer_norm_modulate", "cpu", "bfloat16", "relative error"):
        assert part in message, message


# --------------------------------------------------------------------------------------------
# The choice cache on disk


def choose_once(log: list) -> None:
    with use_kernels("auto"):
        inject("right", log, ["rms_norm"])
        dit.rms_norm(*rms_norm_inputs())


def test_choices_round_trip_through_the_disk_cache(cache_dir):
    log = []
    first = StubTimer(log, kernel_s=0.5)
    with dispatch.isolated(auto_device_types={"cpu"}, timer=first):
        choose_once(log)
        [path] = list(cache_dir.iterdir())
    saved = json.loads(path.read_text())
    assert first.calls == 2 and [r["choice"] for r in saved["choices"].values()] == ["kernel"]
    assert saved["identity"] == choice_cache.device_identity(torch.device("cpu"))
    second = StubTimer(log, kernel_s=2.0)  # would choose the reference if it were asked
    with dispatch.isolated(auto_device_types={"cpu"}, timer=second):
        choose_once(log)
        [choice] = [c for k in dispatch.report()["kernels"] for c in k["choices"]]
    assert second.calls == 0 and choice["choice"] == "kernel" and choice["source"] == "saved"


@pytest.mark.parametrize("part", ["name", "capability", "runtime", "driver", "torch", "triton"])
def test_the_disk_cache_is_ignored_when_any_key_part_changes(cache_dir, monkeypatch, part):
    def identity(device, changed=False):
        base = {"type": "cpu", "name": "GPU", "capability": "8.6", "runtime": "cuda 12.4", "driver": "550.54",
                "torch": "2.5.1", "triton": "3.1.0", "interpreter": "False"}
        return {**base, part: base[part] + "-other"} if changed else base

    log = []
    for changed, expected_calls in ((False, 2), (False, 0), (True, 2)):
        monkeypatch.setattr(dispatch, "device_identity", lambda device, c=changed: identity(device, c))
        timer = StubTimer(log, kernel_s=0.5)
        with dispatch.isolated(auto_device_types={"cpu"}, timer=timer):
            choose_once(log)
        assert timer.calls == expected_calls, (part, changed)


def test_a_file_with_another_identity_is_not_used(cache_dir):
    mine = {"type": "cuda", "name": "A"}
    path = choice_cache.ChoiceFile(mine, cache_dir).path
    cache_dir.mkdir()
    path.write_text(json.dumps({"format": choice_cache.FORMAT, "identity": {"type": "cuda", "name": "B"},
                                "choices": {"k": {"choice": "kernel"}}}))
    assert choice_cache.ChoiceFile(mine, cache_dir).entries == {}


IDENTITY = {"type": "cuda", "name": "A"}
ENTRY = {"format": choice_cache.FORMAT, "identity": IDENTITY}


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", json.dumps({**ENTRY, "choices": 3}).encode(),
                                     json.dumps({**ENTRY, "choices": {"k": {"choice": "maybe"}}}).encode()])
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(cache_dir, caplog, content):
    identity = IDENTITY
    cache_dir.mkdir()
    path = choice_cache.ChoiceFile(identity, cache_dir).path
    path.write_bytes(content)
    caplog.set_level(logging.WARNING, logger="sana")
    cache = choice_cache.ChoiceFile(identity, cache_dir)
    assert cache.entries == {} and any("unreadable" in r.getMessage() for r in caplog.records)
    cache.put("rms_norm|float32|2.6.7 7", {"choice": "reference", "kernel_ms": 2.0, "reference_ms": 1.0})
    assert choice_cache.ChoiceFile(identity, cache_dir).get("rms_norm|float32|2.6.7 7")["choice"] == "reference"


def test_an_unwritable_cache_folder_costs_one_warning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(choice_cache.CACHE_ENV, str(blocker / "cache"))
    caplog.set_level(logging.WARNING, logger="sana")
    log = []
    with dispatch.isolated(auto_device_types={"cpu"}, timer=StubTimer(log, kernel_s=0.5)), use_kernels("auto"):
        inject("right", log, ["rms_norm"])
        for tokens in (37, 300, 3000):  # three shape classes, three choices to save
            dit.rms_norm(*rms_norm_inputs(tokens))
        assert len([c for k in dispatch.report()["kernels"] for c in k["choices"]]) == 3
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1


def test_the_cache_folder_comes_from_the_env_then_the_host_then_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv(choice_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        assert choice_cache.cache_dir() == tmp_path / "xdg" / "sana-comfy"
        choice_cache.set_cache_dir(tmp_path / "comfy-user")
        assert choice_cache.cache_dir() == tmp_path / "comfy-user"
        monkeypatch.setenv(choice_cache.CACHE_ENV, str(tmp_path / "env"))
        assert choice_cache.cache_dir() == tmp_path / "env"
    finally:
        choice_cache.set_cache_dir(None)


# --------------------------------------------------------------------------------------------
# report()


def test_report_probes_a_device_and_lists_the_saved_choices(cache_dir):
    log = []
    with dispatch.isolated(auto_device_types={"cpu"}, timer=StubTimer(log, kernel_s=0.5)):
        choose_once(log)
    with dispatch.isolated():
        inject("wrong", log, ["rms_norm"])
        inject("compile", log, ["rms_norm_2d"])
        inject("right", log, ["layer_norm_modulate"])
        for name in set(dispatch.kernel_names()) - {"rms_norm", "rms_norm_2d", "layer_norm_modulate"}:
            dispatch.register(dataclasses.replace(dispatch.spec(name), load=lambda: (lambda *a, **k: NotImplemented),
                                                  needs_triton=False))
        report = dispatch.report("cpu", [torch.float32])
    json.dumps(report)  # plain data
    by_name = {k["name"]: k for k in report["kernels"]}
    assert [p["status"] for p in by_name["rms_norm"]["probes"]] == ["failed"]
    assert "CompilationError" in by_name["rms_norm_2d"]["probes"][0]["cause"]
    assert [p["status"] for p in by_name["layer_norm_modulate"]["probes"]] == ["passed"]
    assert [p["status"] for p in by_name["int8_linear"]["probes"]] == ["declined"]
    assert [c["source"] for c in by_name["rms_norm"]["choices"]] == ["saved"]
    assert report["devices"]["cpu"]["cache_file"].startswith(str(cache_dir))


# --------------------------------------------------------------------------------------------
# python -m sana doctor


def test_doctor_prints_versions_probes_choices_and_the_memory_plan(cache_dir, capsys):
    from sana.cli import main

    log = []
    with dispatch.isolated(auto_device_types={"cpu"}, timer=StubTimer(log, kernel_s=0.5)):
        choose_once(log)  # a choice saved by an "earlier run"
    with dispatch.isolated():
        inject("wrong", log, ["rms_norm"])
        inject("right", log, set(MODEL_KERNELS) - {"rms_norm"})
        for name in set(dispatch.kernel_names()) - set(MODEL_KERNELS):
            dispatch.register(dataclasses.replace(dispatch.spec(name), load=lambda: (lambda *a, **k: NotImplemented),
                                                  needs_triton=False))
        assert main(["doctor", "--model", "sana-600m-512", "--size", "256x192", "--device", "cpu", "--probe"]) == 0
        text = capsys.readouterr().out
        assert main(["doctor", "--model", "sana-600m-512", "--size", "256x192", "--device", "cpu", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert f"torch {torch.__version__}" in text and "triton " in text and "SANA_KERNELS=auto" in text
    assert "failed (differs from the reference" in lines["rms_norm"] and lines["rms_norm_2d"].endswith("passed")
    assert "declined" in lines["int8_linear"]
    assert "float32 float32 | shapes 2.6.7 7: kernel (kernel 500.000 ms, reference 1000.000 ms; saved)" in text
    assert "memory plan: sana-600m-512 at 256x192, float32" in text and "peak " in text
    plan = data["memory_plan"]
    assert plan["peak"] == max(plan["stages"].values()) > plan["weights"]["text_encoder"] > 0
    assert data["probed"] is False  # cpu without --probe: the references run, nothing probed


def test_doctor_refuses_bad_options_before_any_work(capsys):
    from sana.cli import main

    for argv, message in ((["--size", "1000x1000"], "multiples of 32"), (["--model", "sana-9b"], "not a DiT preset"),
                          (["--size", "big"], "WIDTHxHEIGHT")):
        assert main(["doctor", *argv]) == 2
        assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Import direction


def relative_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(level, module, at module level) of every relative import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    return [(node.level, node.module or "", id(node) in top) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level]


def test_kernels_import_nothing_from_the_models_and_quant_has_no_circle():
    sana_dir = Path(sana.__file__).parent
    for path in sorted((sana_dir / "kernels").glob("*.py")):
        for level, module, top_level in relative_imports(path):
            assert top_level, (path.name, module)  # no function-level import dodging a circle
            assert level == 1 or module in ("errors", "checkpoint"), (path.name, module)  # kernels, errors, checkpoint
    for level, module, top_level in relative_imports(sana_dir / "quant" / "triton_ops.py"):
        assert top_level and level == 2 and module.startswith("kernels"), module  # never back into quant/ops.py
    assert all(top for _, _, top in relative_imports(sana_dir / "quant" / "ops.py"))
