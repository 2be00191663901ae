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
"""

from __future__ import annotations


class SanaError(Exception):
    """Base of every error the project raises on purpose; its message names what is at fault."""


class SanaCheckpointError(SanaError):
    """A file (checkpoint, config, tokenizer, image, cache, run folder) cannot be used."""


class SanaInputError(SanaError, ValueError):
    """A value given by the caller (argument, option, setting) cannot be used."""


class SanaNonFiniteError(SanaError):
    """A stage produced NaN or infinite values; the message names the stage."""


__all__ = ["SanaCheckpointError", "SanaError", "SanaInputError", "SanaNonFiniteError"]
