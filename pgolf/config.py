"""One config dataclass per concern, filled from defaults, then the environment, then the command line.

A field `max_wallclock_seconds` is set by the environment variable `MAX_WALLCLOCK_SECONDS` (what torchrun
users of the record scripts expect) and by the flag `--max-wallclock-seconds`. The field's docstring-like
help comes from `field(metadata={"help": ...})`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _parse_value(kind: Any, text: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if text.lower() in ("", "none", "null"):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _parse_value(inner, text)
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if kind is int:
        return int(float(text)) if "e" in text.lower() else int(text)
    if kind is float:
        return float(text)
    if kind is str:
        return text
    if origin in (tuple, list):
        items = [t for t in text.replace(",", " ").split() if t]
        inner = args[0] if args else str
        return origin(_parse_value(inner, t) for t in items)
    raise TypeError(f"unsupported config type {kind!r}")


def parse_field(cls: type, name: str, text: str) -> Any:
    """`text` parsed as the type of field `name` of dataclass `cls`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ValueError(f"{cls.__name__} has no field {name!r}")
    return _parse_value(_field_type(cls, fields[name]), text)


def env_name(name: str, prefix: str = "") -> str:
    return (prefix + name).upper()


def from_env(cls: type[T], env: Mapping[str, str] | None = None, prefix: str = "", base: T | None = None) -> T:
    """Build `cls` from `base` (or defaults) with fields overridden by environment variables."""
    env = os.environ if env is None else env
    obj = base if base is not None else cls()
    changes = {}
    for f in dataclasses.fields(cls):
        key = env_name(f.name, prefix)
        if key in env:
            try:
                changes[f.name] = _parse_value(_field_type(cls, f), env[key])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"environment variable {key}={env[key]!r}: {exc}") from exc
    return dataclasses.replace(obj, **changes)


def add_arguments(parser: argparse.ArgumentParser, cls: type, group_title: str | None = None) -> None:
    """Add one `--flag` per field of `cls`; defaults are left as None so that unset flags don't override."""
    group = parser.add_argument_group(group_title or cls.__name__)
    defaults = cls()
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} [default: {default!r}; env {env_name(f.name)}]".strip()
        group.add_argument(flag, dest=f.name, default=None, metavar=_metavar(kind), help=help_text,
                           type=lambda s, k=kind: _parse_value(k, s))


def _metavar(kind: Any) -> str:
    name = getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
    return name.upper()


def from_args(cls: type[T], args: argparse.Namespace, base: T) -> T:
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
               if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **changes)


def resolve(cls: type[T], args: argparse.Namespace | None = None, base: T | None = None,
            env: Mapping[str, str] | None = None) -> T:
    """Defaults (or `base`, e.g. a preset) < environment < command line."""
    obj = from_env(cls, env=env, base=base)
    if args is not None:
        obj = from_args(cls, args, obj)
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def dump_json(path: str | os.PathLike, **configs: Any) -> None:
    with open(path, "w") as fh:
        json.dump({k: to_dict(v) for k, v in configs.items()}, fh, indent=2, sort_keys=True)
