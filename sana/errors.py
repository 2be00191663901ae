"""The project's error family: every user-facing failure in `sana/`, `trainer/` and the CLIs.

- `SanaError`: the base; catch it to handle any failure the library reports on purpose.
- `SanaCheckpointError`: a file cannot be used (missing, truncated, wrong keys or shapes, a
  format we do not read, a write that cannot be done safely). The message names the file and,
  where one is at fault, the key with its expected and found shape.
- `SanaInputError`: a value cannot be used (a size, a seed, a guidance scale, an option, a
  prompt). Also a `ValueError`, so code that guards calls with `except ValueError` keeps
  working. The message names the option or argument and the value at fault.
- `SanaNonFiniteError`: a computation produced NaN or infinity (weights, latents, an image, a
  training loss). It names the stage that went non-finite; nothing non-finite is written.

The command lines print one `error: ...` line for any `SanaError` and exit with status 2
(`--debug` shows the traceback). Nothing is half-loaded or half-written when one is raised.

`check_integer` and `check_number` are the shared checks of caller-given numbers: they raise
`SanaInputError` naming the argument, the value and the accepted range.
"""

from __future__ import annotations

import math
import numbers


class SanaError(Exception):
    """Base of every error the project raises on purpose; its message names what is at fault."""


class SanaCheckpointError(SanaError):
    """A file (checkpoint, config, tokenizer, image, cache, run folder) cannot be used."""


class SanaInputError(SanaError, ValueError):
    """A value given by the caller (argument, option, setting) cannot be used."""


class SanaNonFiniteError(SanaError):
    """A stage produced NaN or infinite values; the message names the stage."""


def check_integer(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """`value` as an `int` when it is an integer (a bool is not) in [low, high] (no upper bound
    for None); else `SanaInputError` naming `name`, the value and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SanaInputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SanaInputError(f"{name} must be an integer {bounds}, got {value}")
    return value


def check_number(name: str, value: object, *, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a `float` when it is a finite real number (a bool is not) in [low, high], or
    (low, high] with `low_open`; else `SanaInputError` naming `name`, the value and the range.
    NaN and infinities are refused: every comparison with NaN is false, so an unchecked NaN
    slips past `x > 1`-style rules and poisons the result instead."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SanaInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise SanaInputError(f"{name} must be a finite number in {bounds}, got {value!r}")
    return value


__all__ = ["SanaCheckpointError", "SanaError", "SanaInputError", "SanaNonFiniteError", "check_integer", "check_number"]
