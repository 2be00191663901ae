"""How close a kernel's output must be to its reference's: one definition, used by the
dispatcher's probes on the user's device and by the kernel tests.

Each tolerance answers `mismatch(out, reference_out, oracle_out)` with None (close enough) or a
short description of what differs. Outputs may be a tensor or a tuple of tensors (compared
element by element). `oracle_out` is the reference evaluated on float64 copies of the inputs on
the CPU, for the tolerances that set `uses_oracle`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# Relative L2 error against the float64 oracle.
FP32_TOL = 1e-5
HALF_TOL = 2e-2
# How far a 16-bit result may sit from the oracle, relative to the reference's own error in that
# dtype (plus HALF_ERR_SLACK). Triton's CPU interpreter truncates fp32 → bf16 where compiled code
# rounds to nearest, as PyTorch does: biased roundings that add up over the kernels' (deliberate,
# reference-matching) intermediate roundings, hence the wider factor there.
HALF_ERR_FACTOR = 1.25
HALF_ERR_FACTOR_INTERPRETED = 4.0
HALF_ERR_SLACK = 1e-3


class Tolerance(Protocol):
    uses_oracle: bool

    def mismatch(self, out: Any, reference_out: Any, oracle_out: Any) -> str | None: ...


def rel_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    """‖out − oracle‖ / ‖oracle‖ in float64 (on the CPU)."""
    out, oracle = out.detach().cpu().double(), oracle.detach().cpu().double()
    return ((out - oracle).norm() / oracle.norm()).item()


def _tensors(outputs: Any) -> list[torch.Tensor | None]:
    if isinstance(outputs, (tuple, list)):
        return list(outputs)
    return [outputs]


def _pairs(out: Any, reference_out: Any, oracle_out: Any) -> tuple[list, str | None]:
    outs, references = _tensors(out), _tensors(reference_out)
    oracles = _tensors(oracle_out) if oracle_out is not None else [None] * len(outs)
    if reference_out is None:
        references = [None] * len(outs)
    if not (len(outs) == len(references) == len(oracles)):
        return [], f"{len(outs)} outputs where the reference returns {len(references)}"
    return list(zip(outs, references, oracles)), None


def _shape_mismatch(index: int, out: torch.Tensor, reference: torch.Tensor | None) -> str | None:
    if not isinstance(out, torch.Tensor):
        return f"output {index} is {type(out).__name__}, not a tensor"
    if reference is not None and (out.shape != reference.shape or out.dtype != reference.dtype):
        return (f"output {index} is {out.dtype} {list(out.shape)} where the reference gives "
                f"{reference.dtype} {list(reference.shape)}")
    return None


@dataclass(frozen=True)
class RelativeError:
    """Float outputs against the float64 oracle: fp32 within `FP32_TOL`; 16-bit within `HALF_TOL`
    and within `HALF_ERR_FACTOR`× the reference's own error in that dtype (+ `HALF_ERR_SLACK`),
    4× on the CPU (the interpreter). A NaN anywhere (an element never written) fails."""

    uses_oracle: bool = True

    def mismatch(self, out: Any, reference_out: Any, oracle_out: Any) -> str | None:
        pairs, problem = _pairs(out, reference_out, oracle_out)
        if problem:
            return problem
        for index, (got, reference, oracle) in enumerate(pairs):
            problem = _shape_mismatch(index, got, reference)
            if problem:
                return problem
            if torch.isnan(got).any():
                return f"output {index} holds NaN (an element was not written)"
            err = rel_err(got, oracle)
            if got.dtype in (torch.float32, torch.float64):
                if not err < FP32_TOL:
                    return f"output {index}: relative error {err:.2e} (limit {FP32_TOL:g})"
                continue
            factor = HALF_ERR_FACTOR_INTERPRETED if got.device.type == "cpu" else HALF_ERR_FACTOR
            limit = HALF_TOL if reference is None else min(HALF_TOL, factor * rel_err(reference, oracle) + HALF_ERR_SLACK)
            if not err <= limit:
                return f"output {index}: relative error {err:.2e} (limit {limit:.2e})"
        return None


@dataclass(frozen=True)
class ElementwiseClose:
    """Each element within `rtol`·|reference| + `atol_of_max`·max|reference| of the reference in
    the same dtype (`rtol` per output dtype): for outputs that equal the reference's up to the
    final rounding, e.g. a fused multiply-add in the epilogue instead of a multiply and an add."""

    rtol: dict[torch.dtype, float] = field(default_factory=dict)
    atol_of_max: float = 0.0
    uses_oracle: bool = False

    def mismatch(self, out: Any, reference_out: Any, oracle_out: Any) -> str | None:
        pairs, problem = _pairs(out, reference_out, oracle_out)
        if problem:
            return problem
        for index, (got, reference, _) in enumerate(pairs):
            problem = _shape_mismatch(index, got, reference)
            if problem:
                return problem
            dtype = got.dtype
            got, reference = got.detach().cpu().double(), reference.detach().cpu().double()
            finite = torch.isfinite(reference)
            if not torch.equal(got[~finite], reference[~finite]) or not torch.isfinite(got[finite]).all():
                return f"output {index} ({dtype}): NaN or inf where the reference has none (or a NaN)"
            got, reference = got[finite], reference[finite]
            bound = self.rtol.get(dtype, 0.0) * reference.abs()
            if reference.numel():
                bound += self.atol_of_max * reference.abs().max()
            excess = (got - reference).abs() - bound
            if not (excess <= 0).all():
                return f"output {index} ({dtype}): {int((excess > 0).sum())} elements beyond tolerance"
        return None


@dataclass(frozen=True)
class QuantizedMatch:
    """(int8 values, fp32 scales) against the reference's: values equal except one int8 step on at
    most one element in `steps_per` (where a division lands on .5 within float error), scales
    within `scale_rtol`."""

    steps_per: int = 500
    scale_rtol: float = 1e-6
    uses_oracle: bool = False

    def mismatch(self, out: Any, reference_out: Any, oracle_out: Any) -> str | None:
        values, scales = out
        want_values, want_scales = reference_out
        for index, (got, want) in enumerate(((values, want_values), (scales, want_scales))):
            problem = _shape_mismatch(index, got, want)
            if problem:
                return problem
        steps = (values.detach().cpu().int() - want_values.detach().cpu().int()).abs()
        if steps.numel() and (int(steps.max()) > 1 or int((steps > 0).sum()) > max(1, steps.numel() // self.steps_per)):
            return f"int8 values: {int((steps > 0).sum())} of {steps.numel()} differ, by up to {int(steps.max())} steps"
        scales, want_scales = scales.detach().cpu().double(), want_scales.detach().cpu().double()
        if not torch.isfinite(scales).all():
            return "scales hold NaN/inf (an element was not written)"
        if not ((scales - want_scales).abs() <= self.scale_rtol * want_scales.abs()).all():
            return f"scales: max relative difference {((scales - want_scales).abs() / want_scales.abs()).max().item():.2e}"
        return None

