"""Config dataclasses ↔ config files ↔ command-line options, with one source of help text.

Every field of a config dataclass becomes a `--field-name` option whose help is the field's
`help` metadata, so `--help` documents every option. Values come from, in increasing
priority: the dataclass defaults, a `--config` file (JSON, or TOML on Python ≥ 3.11), and the
command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

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


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--config", type=Path, default=None, help="JSON or TOML file with any of the options below")
    for field in dataclasses.fields(cls):
        base, is_list = _base_type(field.type)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata.get('help', '')} (default: {default!r})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif base in (int, float, str):
            kwargs["type"] = base
        if is_list:
            kwargs["nargs"] = "*"
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        parser.add_argument(flag, **kwargs)


def read_config_file(path: Path) -> dict[str, Any]:
    if path.suffix.lower() == ".toml":
        import tomllib

        return tomllib.loads(path.read_text())
    return json.loads(path.read_text())


def build_config(cls: type[T], args: argparse.Namespace | None = None, **base: Any) -> T:
    """`cls` from `base` values, then the `--config` file, then explicit command-line options."""
    values: dict[str, Any] = dict(base)
    names = {f.name for f in dataclasses.fields(cls)}
    if args is not None and getattr(args, "config", None):
        from_file = read_config_file(args.config)
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise SystemExit(f"{args.config}: unknown option(s) {unknown}")
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
