"""Config dataclasses ↔ config files ↔ command-line options, with one source of help text.

Every field of a config dataclass becomes a `--field-name` option whose help is the field's
`help` metadata, so `--help` documents every option. Values come from, in increasing
priority: the dataclass defaults, a `--config` file (JSON, or TOML on Python ≥ 3.11), and the
command line.

`check_types` and `check_range` validate a built config before anything is loaded; their
`SanaInputError` names the option as it is spelled on the command line (`--grad-accum`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from sana.errors import SanaCheckpointError, SanaInputError

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its `--help` text."""
    if isinstance(default, (list, dict, tuple)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of an annotation like `int`, `str | None`, `list[str]`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"list": list, "tuple": tuple, "dict": dict})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--config", type=Path, default=None, help="JSON or TOML file with any of the options below")
    for field in dataclasses.fields(cls):
        if field.metadata.get("hidden"):  # a field a subclass's command does not take (its check refuses it)
            continue
        base, is_list = _base_type(field.type)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata.get('help', '')} (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            kwargs.update(type=parse_bool, metavar="BOOL")
        elif base in (int, float, str):
            kwargs["type"] = base
        if is_list:
            kwargs["nargs"] = "*"
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        parser.add_argument(flag, **kwargs)


def read_config_file(path: Path) -> dict[str, Any]:
    """The options in a JSON or TOML `--config` file (a table / object of option names)."""
    toml = path.suffix.lower() == ".toml"
    if toml:
        try:
            import tomllib
        except ImportError:
            raise SanaInputError(f"--config {path}: TOML config files need Python 3.11 or newer; use JSON") from None
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if toml else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise SanaCheckpointError(f"--config {path}: cannot be read as {'TOML' if toml else 'JSON'}: {error}") from None
    if not isinstance(values, dict):
        raise SanaCheckpointError(f"--config {path}: expected an object of option names, found {type(values).__name__}")
    return values


def build_config(cls: type[T], args: argparse.Namespace | None = None, **base: Any) -> T:
    """`cls` from `base` values, then the `--config` file, then explicit command-line options."""
    values: dict[str, Any] = dict(base)
    names = {f.name for f in dataclasses.fields(cls)}
    if args is not None and getattr(args, "config", None):
        from_file = read_config_file(args.config)
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise SanaInputError(f"--config {args.config}: unknown option(s) {unknown}")
        values.update(from_file)
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names})
    for field in dataclasses.fields(cls):
        if field.name in values:
            base_type, is_list = _base_type(field.type)
            if is_list and isinstance(values[field.name], tuple):
                values[field.name] = list(values[field.name])
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flag(name: str) -> str:
    """The command-line spelling of a config field: `grad_accum` → `--grad-accum`."""
    return "--" + name.replace("_", "-")


def invalid(name: str, value: Any, expected: str) -> SanaInputError:
    """The error for option `name` holding an unusable `value`; `expected` says what would do."""
    return SanaInputError(f"{flag(name)} {value!r}: {expected}")


def _type_name(base: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(base, str(base))


def _has_type(value: Any, base: Any) -> bool:
    if base is float:  # an integer is a number; bool is not (it is an int subclass)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def check_types(config: Any) -> None:
    """Every field holds its annotated type (lists of it for list fields), a finite number and
    one of its `choices`: values from a `--config` file bypass argparse's checks."""
    for field in dataclasses.fields(config):
        base, is_list = _base_type(field.type)
        value = getattr(config, field.name)
        items = value if is_list else [value]
        if is_list and not isinstance(value, (list, tuple)):
            raise invalid(field.name, value, f"expected a list of {base.__name__} values")
        for item in items:
            if not _has_type(item, base):
                raise invalid(field.name, value, f"expected {_type_name(base)}")
            if base is float and not math.isfinite(item):
                raise invalid(field.name, value, "expected a finite number")
        choices = field.metadata.get("choices")
        if choices is not None and value not in choices:
            raise invalid(field.name, value, f"expected one of {choices}")


def check_range(config: Any, name: str, *, at_least: float | None = None, above: float | None = None,
                below: float | None = None, at_most: float | None = None) -> None:
    """Raise the option's `SanaInputError` unless its value lies within the given bounds."""
    value = getattr(config, name)
    bounds = [(at_least, lambda v, b: v >= b, "≥"), (above, lambda v, b: v > b, ">"),
              (below, lambda v, b: v < b, "<"), (at_most, lambda v, b: v <= b, "≤")]
    for bound, holds, sign in bounds:
        if bound is not None and not holds(value, bound):
            wanted = " and ".join(f"{s} {b}" for b, _, s in bounds if b is not None)
            raise invalid(name, value, f"must be {wanted}")


def output_folder(path: str | Path, option: str) -> Path:
    """Make the folder `option` (e.g. "--out-dir") names, before the work whose results go there:
    a path that cannot be a folder is a `SanaInputError` then, not a lost run afterwards."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SanaInputError(f"{option} {folder}: cannot be made a folder ({error.strerror or error})") from None
    return folder
