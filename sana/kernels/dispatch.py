"""The one dispatcher for every Triton kernel of sana: the model's (`sana.ops.fused`) and the
W8A8 ones (`sana.quant.ops`).

A kernel is registered (`register(KernelSpec(...))`) with how to load it, how to draw small
probe inputs, the tolerance it must meet and whether it has a backward; a PyTorch reference of
the same signature is then wrapped with `routed(reference)`, which sends each call to one side:

- `SANA_KERNELS=torch` (or `use_kernels("torch")` within a block): always the reference.
- `SANA_KERNELS=triton`: always the kernel, for tests and benchmarks (CPU tensors need
  `TRITON_INTERPRET=1`); its errors propagate.
- `SANA_KERNELS=auto` (default): the kernel only where it has proved itself.
  1. Probe, at first use per (kernel, device, variant). The variant is what selects a compiled
     code path: the dtypes and channels-last layouts of the tensor arguments, which optional
     ones are None, the flags and dtype arguments. Kernel and reference run on small random
     inputs of that variant (odd sizes, as the tests'; gradients too for a kernel with a
     backward) and are compared with the kernel's tolerance (the tests' own). A compile or
     launch error or a mismatch sends the kernel to its reference on that device and variant
     for the rest of the process, with a warning on the "sana" logger naming kernel, device,
     variant and cause: one line per kernel and device (other variants' go to the debug log).
  2. Timing, at first use per (kernel, device, variant, shape class — the bit length of every
     dimension). Kernel and reference (as plain PyTorch) run on the call's own inputs (copies
     of those they write in place), timed with device events after a warm-up, and the faster is
     kept, in memory and on disk (`choice_cache`, keyed by device and versions).
  3. An error of the kernel at a real shape later does what a failed probe does, and the call
     returns the reference's result. (Out of memory is raised instead: the device is full, not
     the kernel wrong.)
  Once decided, a call's route is one dictionary lookup on its exact signature.
  Only device types with a Triton backend take part: CUDA (NVIDIA, and AMD under ROCm) and
  Intel XPU. CPU and MPS tensors get the reference, and so does a call made while a CUDA graph
  is captured before its kernel has been probed and timed.

In every mode a call traced by `torch.compile` takes the reference (the compiler fuses it
itself), and a forward-only kernel is skipped when autograd needs gradients of its inputs.
`report()` says what was decided. `isolated()` gives tests a fresh state, with hooks for the
device types that take part and for the timer.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SanaInputError
from .choice_cache import ChoiceFile, cache_dir, device_identity, triton_version
from .launch import interpreting
from .tolerance import Tolerance

KERNELS_ENV = "SANA_KERNELS"
KERNEL_BACKENDS = ("auto", "triton", "torch")
# Device types with a Triton backend (ROCm devices are "cuda" devices to torch).
AUTO_DEVICE_TYPES = frozenset({"cuda", "xpu"})
TIMING_REPEATS = 5
PROBE_SEED = 0

PASSED, FAILED, DECLINED = "passed", "failed", "declined"
_UNDECIDED = object()
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_log = logging.getLogger("sana")


# --------------------------------------------------------------------------------------------
# Registration


class ProbeInputs:
    """What a probe builder draws its arguments from: random tensors from a fixed seed, on the
    probed device, each in the dtype and memory format of the real call's argument of the same
    name (`like`), else in the builder's `dtype=`, else in the probed `dtype`. With `oracle`,
    the same values (rounded to those dtypes) as float64 on the CPU."""

    def __init__(self, device: torch.device, dtype: torch.dtype, like: Mapping[str, Any] | None = None, oracle: bool = False):
        self.device, self.dtype, self.like, self.oracle = device, dtype, dict(like or {}), oracle
        self._generator = torch.Generator().manual_seed(PROBE_SEED)

    def _place(self, param: str, values: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        real = self.like.get(param)
        channels_last = False
        if isinstance(real, torch.Tensor) and real.is_floating_point():
            dtype, channels_last = real.dtype, _layout(real) != real.dtype
        out = values.to(dtype or self.dtype)
        out = out.double() if self.oracle else out.to(self.device)
        return out.contiguous(memory_format=torch.channels_last) if channels_last and out.ndim == 4 else out

    def randn(self, param: str, *shape: int, scale: float = 1.0, offset: float = 0.0,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """Normal values · scale + offset (in fp32, rounded once to the argument's dtype)."""
        return self._place(param, torch.randn(*shape, generator=self._generator) * scale + offset, dtype)

    def positive(self, param: str, *shape: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Values in [0.1, 1.1) · scale: scales."""
        return self._place(param, (torch.rand(*shape, generator=self._generator) + 0.1) * scale, dtype)

    def int8(self, *shape: int) -> torch.Tensor:
        """int8 values in [-127, 127]."""
        values = torch.randint(-127, 128, shape, generator=self._generator, dtype=torch.int8)
        return values if self.oracle else values.to(self.device)


@dataclass(frozen=True)
class KernelSpec:
    """A kernel as the dispatcher knows it.

    `load()` returns the kernel function (importing its module; triton compiles at the first
    launch), which takes the reference's arguments and may return NotImplemented for inputs it
    does not take. `probe(inputs)` returns small random arguments by parameter name.
    `mutates` names the arguments that kernel or reference may write in place (timing runs
    on copies of those). `needs_triton`: False for test doubles that run without triton.
    """

    name: str
    load: Callable[[], Callable]
    probe: Callable[[ProbeInputs], dict[str, Any]]
    tolerance: Tolerance
    differentiable: bool = False
    mutates: tuple[str, ...] = ()
    needs_triton: bool = True


@dataclass(frozen=True)
class Verdict:
    """A probe's outcome: PASSED, FAILED (with the cause) or DECLINED (the kernel does not take
    that variant: the reference serves it, without a warning)."""

    status: str
    cause: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def _backend_from_env() -> str:
    backend = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if backend not in KERNEL_BACKENDS:
        raise SanaInputError(f"{KERNELS_ENV}={backend!r}: expected one of {', '.join(KERNEL_BACKENDS)}")
    return backend


Timer = Callable[[Callable[[], Any], torch.device], float]


@dataclass
class _State:
    backend: str
    auto_device_types: frozenset[str] = AUTO_DEVICE_TYPES
    timer: Timer | None = None  # None: `measure`
    kernels: dict[str, Callable] = field(default_factory=dict)  # loaded kernel functions
    verdicts: dict[tuple, Verdict] = field(default_factory=dict)  # (name, device, variant) →
    choices: dict[tuple, dict[str, Any]] = field(default_factory=dict)  # ((name, device, variant), shapes) →
    files: dict[torch.device, ChoiceFile | None] = field(default_factory=dict)
    decisions: dict[tuple, Callable | None] = field(default_factory=dict)  # exact call signature → kernel or None


_specs: dict[str, KernelSpec] = {}
_references: dict[str, Callable] = {}  # name → the reference `routed` wraps
_state = _State(backend=_backend_from_env())  # read once: a compiled graph depends on no env
_lock = threading.RLock()  # probes and timings: one at a time
_triton_importable: bool | None = None


def register(spec: KernelSpec) -> None:
    """Add a kernel, or replace one (forgetting what was decided about the old one)."""
    with _lock:
        _specs[spec.name] = spec
        _forget(spec.name)


def _forget(name: str) -> None:
    _state.kernels.pop(name, None)
    for key in [k for k in _state.decisions if k[0] == name]:
        del _state.decisions[key]
    for key in [k for k in _state.verdicts if k[0] == name]:
        del _state.verdicts[key]
    for key in [k for k in _state.choices if k[0][0] == name]:
        del _state.choices[key]


def spec(name: str) -> KernelSpec:
    if name not in _specs:
        raise SanaInputError(f"no kernel {name!r} is registered; known: {', '.join(sorted(_specs))}")
    return _specs[name]


def kernel_names() -> list[str]:
    return sorted(_specs)


# --------------------------------------------------------------------------------------------
# Backend


def kernel_backend() -> str:
    """"auto" (kernels that proved themselves on the device), "triton" (always) or "torch" (never)."""
    return _state.backend


@contextlib.contextmanager
def use_kernels(backend: str) -> Iterator[None]:
    """Route every kernel as `SANA_KERNELS=backend` would, within the block.

    "triton" also routes CPU tensors to Triton, which runs them only under `TRITON_INTERPRET=1`
    (the tests do this).
    """
    if backend not in KERNEL_BACKENDS:
        raise SanaInputError(f"unknown kernel backend {backend!r}: expected one of {', '.join(KERNEL_BACKENDS)}")
    state = _state
    previous, state.backend = state.backend, backend
    try:
        yield
    finally:
        state.backend = previous


def triton_available() -> bool:
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_importable = True
        except Exception:  # ImportError, or a broken install failing at import
            _triton_importable = False
    return _triton_importable


# --------------------------------------------------------------------------------------------
# Routing


def routed(reference: Callable, name: str | None = None) -> Callable:
    """Wrap `reference` so that each call goes to the registered kernel `name` (default: the
    reference's own name) or to the reference, by the rules above. `fn.reference` is the
    undecorated reference."""
    name = name or reference.__name__
    spec(name)  # registered first: a typo fails at import, not at the first call
    _references[name] = reference

    @functools.wraps(reference)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return reference(*args, **kwargs)
        return _route(name, reference, args, kwargs)

    dispatch.reference = reference
    return dispatch


def _route(name: str, reference: Callable, args: tuple, kwargs: dict) -> Any:
    backend = _state.backend
    if backend == "torch":
        return reference(*args, **kwargs)
    kernel_spec = _specs[name]
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors or (
        not kernel_spec.differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    ):
        return reference(*args, **kwargs)  # forward-only kernel: training runs the reference
    if backend == "triton":
        return _forced(kernel_spec, reference, tensors, args, kwargs)
    return _auto(kernel_spec, reference, tensors, args, kwargs)


def _forced(kernel_spec: KernelSpec, reference: Callable, tensors: list[torch.Tensor], args: tuple, kwargs: dict) -> Any:
    if kernel_spec.needs_triton:
        if not triton_available():
            raise RuntimeError(f"{KERNELS_ENV}=triton, but triton does not import")
        if any(t.device.type == "cpu" for t in tensors) and not interpreting():
            raise RuntimeError(f"{KERNELS_ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 (tests only)")
    out = _kernel(kernel_spec)(*args, **kwargs)
    return reference(*args, **kwargs) if out is NotImplemented else out


def _auto(kernel_spec: KernelSpec, reference: Callable, tensors: list[torch.Tensor], args: tuple, kwargs: dict) -> Any:
    device = tensors[0].device
    if device.type not in _state.auto_device_types:
        return reference(*args, **kwargs)
    key = _call_key(kernel_spec.name, args, kwargs)
    try:
        kernel = _state.decisions.get(key, _UNDECIDED)
    except TypeError:  # an unhashable argument: decided at every call
        key, kernel = None, _UNDECIDED
    if kernel is _UNDECIDED:
        kernel, final = _decide(kernel_spec, reference, device, tensors, args, kwargs)
        if final and key is not None:
            _state.decisions[key] = kernel
    if kernel is None:
        return reference(*args, **kwargs)
    try:
        out = kernel(*args, **kwargs)
    except _OUT_OF_MEMORY:
        raise  # the device is full, not the kernel at fault: the caller frees memory and retries
    except Exception as error:
        probe_key = (kernel_spec.name, device, _signature(args, kwargs)[0])
        _fall_back(probe_key, f"{_error_text(error)} (at {_shapes_text(tensors)})")
        return reference(*args, **kwargs)
    return reference(*args, **kwargs) if out is NotImplemented else out


def _call_key(name: str, args: tuple, kwargs: dict) -> tuple:
    """The exact signature of a call (each tensor's device, dtype, shape and strides, the other
    arguments' values): the key of the hot path's one lookup."""
    parts: list[Any] = [name]
    for value in (*args, *kwargs.values()):
        parts.append((value.device, value.dtype, value.shape, value.stride()) if isinstance(value, torch.Tensor) else value)
    if kwargs:
        parts.append(tuple(kwargs))
    return tuple(parts)


def _decide(kernel_spec: KernelSpec, reference: Callable, device: torch.device, tensors: list[torch.Tensor],
            args: tuple, kwargs: dict) -> tuple[Callable | None, bool]:
    """(the kernel, or None for the reference; whether that is final for this call signature):
    probe at the variant's first use, the timing choice at the shape class's first use."""
    if any(t.device != device for t in tensors) or (kernel_spec.needs_triton and not triton_available()):
        return None, True
    variant, shapes = _signature(args, kwargs)
    probe_key = (kernel_spec.name, device, variant)
    verdict = _state.verdicts.get(probe_key)
    if verdict is None:
        verdict = _probe_first_use(kernel_spec, reference, probe_key, args, kwargs)
        if verdict is None:
            return None, False  # not probed now (a graph capture, or the device was full): later
    if not verdict.passed:
        return None, True
    record = _state.choices.get((probe_key, shapes))
    if record is None:
        record = _choose(kernel_spec, reference, probe_key, shapes, args, kwargs)
        if record is None:
            return None, probe_key not in _state.verdicts or not _state.verdicts[probe_key].passed
    return (_kernel(kernel_spec) if record["choice"] == "kernel" else None), True


def _layout(t: torch.Tensor) -> Any:
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return (t.dtype, "channels_last")
    return t.dtype


def _signature(args: tuple, kwargs: dict) -> tuple[tuple, tuple]:
    """(variant, shape class) of a call; see the module docstring."""
    variant, shapes = [], []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            variant.append(_layout(value))
            shapes.append(tuple(d.bit_length() for d in value.shape))
        elif value is None or isinstance(value, (bool, torch.dtype)):
            variant.append(value)
    if kwargs:
        variant.append(tuple(kwargs))
    return tuple(variant), tuple(shapes)


def _kernel(kernel_spec: KernelSpec) -> Callable:
    kernel = _state.kernels.get(kernel_spec.name)
    if kernel is None:
        kernel = _state.kernels[kernel_spec.name] = kernel_spec.load()
    return kernel


def _bind(reference: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    bound = inspect.signature(reference).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


# --------------------------------------------------------------------------------------------
# Probes


def _probe_first_use(kernel_spec: KernelSpec, reference: Callable, probe_key: tuple, args: tuple, kwargs: dict) -> Verdict | None:
    with _lock:
        if probe_key in _state.verdicts:
            return _state.verdicts[probe_key]
        device = probe_key[1]
        if _capturing(device):
            return None
        like = _bind(reference, args, kwargs).arguments
        dtype = next((t.dtype for t in like.values() if isinstance(t, torch.Tensor) and t.is_floating_point()), torch.float32)
        verdict = run_probe(kernel_spec.name, device, dtype, like, reference)
        if verdict is not None:
            _record(probe_key, verdict)
        return verdict


def probe(name: str, device: str | torch.device, dtype: torch.dtype) -> Verdict:
    """Probe kernel `name` on `device` with its default probe inputs in `dtype` (memoised as the
    variant "default <dtype>"). Runs on any device, the CPU included (under TRITON_INTERPRET=1)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, device, ("default", dtype))
    with _lock:
        if key not in _state.verdicts:
            verdict = run_probe(name, device, dtype)
            _record(key, verdict if verdict is not None else Verdict(FAILED, "out of memory during the probe"))
        return _state.verdicts[key]


def run_probe(name: str, device: torch.device, dtype: torch.dtype, like: Mapping[str, Any] | None = None,
              reference: Callable | None = None) -> Verdict | None:
    """Run kernel `name` and its reference on probe inputs (shaped after `like`, the bound
    arguments of a real call, when given) and compare. None when the device ran out of memory
    (no verdict: the device is full, not the kernel wrong)."""
    kernel_spec = spec(name)
    reference = reference or _references[name]
    try:
        kernel = _kernel(kernel_spec)
        with _neutral_modes(device):
            cause = _probe_mismatch(kernel_spec, kernel, reference, device, dtype, like)
    except _OUT_OF_MEMORY:
        return None
    except Exception as error:  # a compile error, a launch error, a broken install: all the kernel's
        return Verdict(FAILED, _error_text(error))
    if cause is DECLINED:
        return Verdict(DECLINED, "the kernel does not take these inputs")
    return Verdict(FAILED, cause) if cause else Verdict(PASSED)


def _probe_arguments(kernel_spec: KernelSpec, inputs: ProbeInputs) -> dict[str, Any]:
    arguments = kernel_spec.probe(inputs)
    for param, value in inputs.like.items():  # the real call's flags, dtypes and absent optionals
        if value is None or isinstance(value, (bool, torch.dtype)):
            arguments[param] = value
    return arguments


def _probe_mismatch(kernel_spec: KernelSpec, kernel: Callable, reference: Callable, device: torch.device,
                    dtype: torch.dtype, like: Mapping[str, Any] | None) -> str | None:
    def arguments(oracle: bool = False) -> dict[str, Any]:
        return _probe_arguments(kernel_spec, ProbeInputs(device, dtype, like, oracle))

    out = kernel(**arguments())
    if out is NotImplemented:
        return DECLINED
    _synchronize(device)  # an asynchronous launch failure surfaces here, inside the probe
    tolerance = kernel_spec.tolerance
    # A reference that calls other routed functions runs as pure PyTorch here. (The backend is
    # process-wide: another thread's calls meanwhile take the reference too, which is harmless.)
    with use_kernels("torch"):
        oracle = reference(**arguments(oracle=True)) if tolerance.uses_oracle else None
        cause = tolerance.mismatch(out, reference(**arguments()), oracle)
    if cause is None and kernel_spec.differentiable:
        cause = _gradient_mismatch(kernel, reference, arguments, tolerance)
        cause = cause and f"gradients: {cause}"
    return cause and f"differs from the reference: {cause}"


def _gradient_mismatch(kernel: Callable, reference: Callable, arguments: Callable[..., dict], tolerance: Tolerance) -> str | None:
    """Gradients of every floating input for one random upstream gradient, kernel against reference."""

    def gradients(fn: Callable, oracle: bool, upstream_dtype: torch.dtype | None) -> tuple[list, torch.dtype]:
        args = arguments(oracle)
        leaves = {k: v.detach().requires_grad_(True) for k, v in args.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()}
        with torch.enable_grad():
            out = fn(**{**args, **leaves})
            dtype = upstream_dtype or out.dtype
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(PROBE_SEED + 1)).to(dtype)
            out.backward(upstream.double() if oracle else upstream.to(out.device))
        return [leaf.grad for leaf in leaves.values()], dtype

    got, dtype = gradients(kernel, False, None)
    with use_kernels("torch"):
        expected, _ = gradients(reference, False, dtype)
        oracle = gradients(reference, True, dtype)[0] if tolerance.uses_oracle else None
    keep = [i for i, g in enumerate(expected) if g is not None]
    return tolerance.mismatch(tuple(got[i] for i in keep), tuple(expected[i] for i in keep),
                              tuple(oracle[i] for i in keep) if oracle is not None else None)


@contextlib.contextmanager
def _neutral_modes(device: torch.device) -> Iterator[None]:
    """No autograd, no autocast and no inference mode from the caller leak into a probe."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        for device_type in {device.type, "cpu"}:
            with contextlib.suppress(Exception):  # a device type without autocast
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _record(probe_key: tuple, verdict: Verdict) -> None:
    _state.verdicts[probe_key] = verdict
    if verdict.status == FAILED:
        _warn_fallback(probe_key, verdict.cause)


def _fall_back(probe_key: tuple, cause: str) -> None:
    """The kernel failed on a real call: the reference serves this (kernel, device, variant) from now on."""
    with _lock:
        previous = _state.verdicts.get(probe_key)
        if previous is None or previous.status != FAILED:
            _record(probe_key, Verdict(FAILED, cause))
        for key in [k for k in _state.decisions if k[0] == probe_key[0]]:
            del _state.decisions[key]  # decided again, from the verdicts, at the next call


def _warn_fallback(probe_key: tuple, cause: str) -> None:
    """One warning per kernel and device (the log line a user sees); the fallbacks of its other
    variants there go to the debug log (all are in `report()`)."""
    name, device, variant = probe_key
    first = sum(1 for (n, d, _), v in _state.verdicts.items() if n == name and d == device and v.status == FAILED) == 1
    _log.log(logging.WARNING if first else logging.DEBUG,
             "sana: kernel %s falls back to its PyTorch reference on %s for %s, for the rest of this process: %s",
             name, device_label(device), describe_variant(variant), cause)


def _error_text(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}" if text else type(error).__name__


def _shapes_text(tensors: Iterable[torch.Tensor]) -> str:
    return ", ".join(str(list(t.shape)) for t in tensors)


# --------------------------------------------------------------------------------------------
# Timing


def measure(run: Callable[[], Any], device: torch.device, repeats: int = TIMING_REPEATS) -> float:
    """Median seconds of `run()` on `device` after one warm-up call (compiles, autotunes, fills
    caches): device events where the backend has them (CUDA, ROCm, XPU), else a synchronize
    and the host clock."""
    events = getattr(getattr(torch, device.type, None), "Event", None) if device.type in ("cuda", "xpu") else None
    run()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        if events is not None:
            start, end = events(enable_timing=True), events(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            run()
            _synchronize(device)
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _choose(kernel_spec: KernelSpec, reference: Callable, probe_key: tuple, shapes: tuple, args: tuple,
            kwargs: dict) -> dict[str, Any] | None:
    """The memoised timing choice for a shape class: from memory, the disk, or a timing now."""
    with _lock:
        memo_key = (probe_key, shapes)
        if memo_key in _state.choices:
            return _state.choices[memo_key]
        name, device, variant = probe_key
        choice_file = _choice_file(device)
        disk_key = _disk_key(name, variant, shapes)
        saved = choice_file.get(disk_key) if choice_file is not None else None
        if saved is not None:
            record = {**saved, "source": "saved"}
        else:
            if _capturing(device):
                return None
            try:
                record, keep = _time(kernel_spec, reference, device, args, kwargs)
            except Exception as error:
                _fall_back(probe_key, f"{_error_text(error)} (timing at {describe_shapes(shapes)})")
                return None
            if keep and choice_file is not None:
                choice_file.put(disk_key, record)
            record = {**record, "source": "timed"}
        _state.choices[memo_key] = record
        return record


def _disk_key(name: str, variant: tuple, shapes: tuple) -> str:
    return f"{name}|{describe_variant(variant)}|{describe_shapes(shapes)}"


def _time(kernel_spec: KernelSpec, reference: Callable, device: torch.device, args: tuple,
          kwargs: dict) -> tuple[dict[str, Any], bool]:
    """(choice record, whether it belongs on disk). Kernel errors propagate."""
    bound = _bind(reference, args, kwargs)
    for param in kernel_spec.mutates:  # both sides get the same copy: its values do not matter
        if isinstance(bound.arguments.get(param), torch.Tensor):
            bound.arguments[param] = bound.arguments[param].clone()
    kernel, timer = _kernel(kernel_spec), _state.timer or measure
    args, kwargs = bound.args, bound.kwargs
    try:
        # The reference as plain PyTorch (routed functions it calls included): kernel against reference.
        with torch.no_grad(), use_kernels("torch"):
            if kernel(*args, **kwargs) is NotImplemented:
                return {"choice": "reference", "note": "the kernel does not take these inputs"}, False
            kernel_s = timer(lambda: kernel(*args, **kwargs), device)
            reference_s = timer(lambda: reference(*args, **kwargs), device)
    except _OUT_OF_MEMORY:
        # Not timed; the kernel passed its probe and needs less memory than the reference.
        return {"choice": "kernel", "note": "not timed: out of memory"}, False
    choice = "kernel" if kernel_s < reference_s else "reference"
    return {"choice": choice, "kernel_ms": round(kernel_s * 1e3, 4), "reference_ms": round(reference_s * 1e3, 4)}, True


def _choice_file(device: torch.device) -> ChoiceFile | None:
    if device not in _state.files:
        try:
            _state.files[device] = ChoiceFile(device_identity(device))
        except Exception as error:  # a device whose properties cannot be read: memory only
            _log.warning("sana: kernel choices on %s stay in memory: %s", device, _error_text(error))
            _state.files[device] = None
    return _state.files[device]


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured (no synchronisation allowed)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _synchronize(device: torch.device) -> None:
    synchronize = getattr(getattr(torch, device.type, None), "synchronize", None)
    if device.type != "cpu" and synchronize is not None:
        synchronize(device)


# --------------------------------------------------------------------------------------------
# Reports and tests


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_variant(variant: tuple) -> str:
    """A variant in words, e.g. "bfloat16 bfloat16 none True" (one entry per tensor, None, flag
    or dtype argument, in order)."""
    if len(variant) == 2 and variant[0] == "default":
        return f"{_dtype_name(variant[1])} (default probe)"
    words = []
    for item in variant:
        if isinstance(item, torch.dtype):
            words.append(_dtype_name(item))
        elif isinstance(item, tuple) and item and isinstance(item[0], torch.dtype):
            words.append(f"{_dtype_name(item[0])}/channels-last")
        elif isinstance(item, tuple):
            words.append("keywords:" + ",".join(item))
        else:
            words.append("none" if item is None else str(item))
    return " ".join(words)


def describe_shapes(shapes: tuple) -> str:
    """A shape class in words: each tensor's dimensions as bit lengths (a dimension d has bit
    length b when 2^(b-1) ≤ d < 2^b), e.g. "2.6.7 7" for [2, 37, 96] and [96]."""
    return " ".join(".".join(map(str, bits)) for bits in shapes)


def device_label(device: torch.device) -> str:
    try:
        if device.type == "cuda":
            return f"{device} ({torch.cuda.get_device_name(device)})"
        if device.type == "xpu":
            return f"{device} ({torch.xpu.get_device_name(device)})"
    except Exception:  # a label is not worth an error
        pass
    return str(device)


def report(device: str | torch.device | None = None, dtypes: Iterable[torch.dtype] = ()) -> dict[str, Any]:
    """What the dispatcher knows, as plain data (strings, numbers, lists, dicts): the backend,
    versions, every device it probed on (its identity and choice file), and per kernel the
    probe verdicts and timing choices.

    With `device`, every registered kernel is first probed there in each of `dtypes` (default
    probe inputs), and the choices saved on disk for that device from earlier runs are listed.
    """
    if device is not None:
        device = torch.device(device)
        for name in kernel_names():
            for dtype in dtypes:
                probe(name, device, dtype)
    used = {key[1] for key in _state.verdicts} | ({device} if device is not None else set())
    devices = {str(d): _device_entry(d) for d in sorted(used, key=str)}
    kernels = []
    for name in kernel_names():
        probes = [{"device": str(d), "variant": describe_variant(v), "status": verdict.status, "cause": verdict.cause}
                  for (n, d, v), verdict in _state.verdicts.items() if n == name]
        choices, in_memory = [], set()
        for ((n, d, v), shapes), record in _state.choices.items():
            if n == name:
                choices.append({"device": str(d), "variant": describe_variant(v), "shapes": describe_shapes(shapes), **record})
                in_memory.add((d, _disk_key(n, v, shapes)))
        choice_file = _state.files.get(device) if device is not None else None
        for key, record in (choice_file.entries.items() if choice_file is not None else ()):
            saved_name, variant, shapes = (key.split("|") + ["", ""])[:3]
            if saved_name == name and (device, key) not in in_memory:
                choices.append({"device": str(device), "variant": variant, "shapes": shapes, **record, "source": "saved"})
        kernels.append({"name": name, "differentiable": _specs[name].differentiable, "probes": probes, "choices": choices})
    return {
        "backend": _state.backend,
        "torch": torch.__version__,
        "triton": triton_version(),
        "auto_device_types": sorted(_state.auto_device_types),
        "cache_dir": str(cache_dir()),
        "devices": devices,
        "kernels": kernels,
    }


def _device_entry(device: torch.device) -> dict[str, Any]:
    entry: dict[str, Any] = {"label": device_label(device), "auto": device.type in _state.auto_device_types}
    choice_file = _choice_file(device)
    if choice_file is not None:
        entry.update(identity=choice_file.identity, cache_file=str(choice_file.path))
    return entry


@contextlib.contextmanager
def isolated(*, auto_device_types: Iterable[str] | None = None, timer: Timer | None = None) -> Iterator[None]:
    """A fresh dispatcher state within the block (the backend carried over): no loaded kernels,
    verdicts or choices; registrations made inside are undone on exit. Test hooks: the device
    types `auto` probes on (e.g. {"cpu"}), and the timer (`measure`'s signature)."""
    global _state
    saved_state, saved_specs, saved_references = _state, dict(_specs), dict(_references)
    _state = _State(backend=saved_state.backend, timer=timer,
                    auto_device_types=frozenset(auto_device_types) if auto_device_types is not None else AUTO_DEVICE_TYPES)
    try:
        yield
    finally:
        _state = saved_state
        _specs.clear()
        _specs.update(saved_specs)
        _references.clear()
        _references.update(saved_references)

