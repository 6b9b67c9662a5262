"""Run configs: one YAML file per run, read into a frozen dataclass, every field overridable.

Each stage declares one dataclass whose fields use :func:`option` for help text and bounds.
:func:`add_arguments` turns the fields into ``--flag-name`` options; :func:`resolve` merges
defaults, the YAML file and the flags (in that order) and validates types and ranges, raising
:class:`~ssl_kd.errors.ConfigError` that names the offending key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import yaml

from ssl_kd import atomic, storage
from ssl_kd.errors import ConfigError, UserError

T = TypeVar("T")

_NULL_WORDS = {"null", "none", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    operational: bool = False,
) -> Any:
    """A dataclass field with help text and inclusive (min, max) or exclusive (gt) bounds.

    ``operational`` marks a key that changes where or how a run is watched, never what it
    computes: a run may resume with another value, and the pipeline leaves it out of fingerprints.
    """
    meta = {"help": help, "min": min, "max": max, "gt": gt, "operational": operational}
    if isinstance(default, (dict, list)):  # mutable: every instance gets its own copy
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def operational_keys(cls: type) -> frozenset[str]:
    """The fields of config class ``cls`` declared with ``option(..., operational=True)``."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("operational"))


def _default(f: dataclasses.Field) -> Any:
    """The field's default value, or ``dataclasses.MISSING``."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is dict:
        return "mapping"
    if origin is list:
        return "comma-separated list of " + _describe(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert a YAML value or command-line string to ``tp``, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_null = value is None or (isinstance(value, str) and value.lower() in _NULL_WORDS)
        if is_null and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                pass
        raise ConfigError(key, f"expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            allowed = ", ".join(str(c) for c in choices)
            raise ConfigError(key, f"must be one of {allowed}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping of keys to values, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # from the command line: comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(key, item, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_bounds(key: str, meta: Mapping[str, Any], value: Any) -> None:
    if isinstance(value, list):
        for item in value:
            _check_bounds(key, meta, item)
        return
    if value is None or isinstance(value, (str, bool, dict)):
        return
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(key, f"must be >= {meta['min']}, got {value}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(key, f"must be <= {meta['max']}, got {value}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(key, f"must be > {meta['gt']}, got {value}")


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build and validate ``cls`` from a mapping; unknown or missing keys raise ConfigError."""
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(str(key), f"unknown key (known keys: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            value = _coerce(name, hints[name], data[name])
        elif _default(f) is not dataclasses.MISSING:
            value = _default(f)
        else:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(name, f"is required: set it in the config file or with {flag}")
        _check_bounds(name, f.metadata, value)
        values[name] = value
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping raises UserError."""
    p = storage.display(path)
    if not storage.is_file(path):
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of keys to values")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config`` and one ``--flag`` per field of ``cls`` (values validated later)."""
    parser.add_argument("--config", metavar="YAML", help="config file; flags override its keys")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is dict:
            continue  # sections of a pipeline config: set from YAML or ``--set section.key=value``
        flag = "--" + f.name.replace("_", "-")
        value = _default(f)
        default = "required" if value is dataclasses.MISSING else f"default: {value}"
        help_text = f"{f.metadata.get('help', '')} ({_describe(hints[f.name])}; {default})"
        # A bare boolean flag means true; ``--flag false`` still works (and YAML-like words).
        extra: dict[str, Any] = {"nargs": "?", "const": True} if hints[f.name] is bool else {}
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, **extra)


def resolve(cls: type[T], args: argparse.Namespace) -> T:
    """Merge defaults < ``--config`` YAML < command-line flags into a validated ``cls``."""
    data: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        data.update(read_yaml(config_path))
    names = {f.name for f in dataclasses.fields(cls)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (YAML/JSON-able)."""
    return dataclasses.asdict(cfg)


def save(cfg: Any, path: str | os.PathLike[str]) -> str:
    """Write the resolved config as YAML, atomically; returns the path."""
    return atomic.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
