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
from collections.abc import Callable, Mapping, Sequence
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
    flag: str | None = None,
    metavar: str | None = None,
    positional: bool = False,
    exclusive: str | None = None,
    nargs: str | None = None,
) -> Any:
    """A dataclass field with help text and inclusive (min, max) or exclusive (gt) bounds.

    ``operational`` marks a key that changes where or how a run is watched, never what it
    computes: a run may resume with another value, and the pipeline leaves it out of fingerprints.
    The rest shape the command line: ``flag`` replaces ``--field-name``, ``metavar`` names the
    value in ``--help``, ``positional`` makes the field a positional argument, and fields that
    share an ``exclusive`` name may not be given together, and ``nargs="+"`` lets a list field
    take its values as separate words (``--mean 0.485 0.456 0.406``) as well as comma-separated.
    """
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "gt": gt,
        "operational": operational,
        "flag": flag,
        "metavar": metavar,
        "positional": positional,
        "exclusive": exclusive,
        "nargs": nargs,
    }
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


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: ``--field-name`` unless declared otherwise."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


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
        return _to_union(key, tp, value)
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
        elif (
            item is not str
            and isinstance(value, (list, tuple))
            and all(isinstance(v, str) for v in value)
        ):
            value = [w.strip() for v in value for w in v.split(",") if w.strip()]  # nargs words
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one number for a list of numbers (mean: 0.5)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(key, item, v) for v in value]
    if tp not in _SCALARS:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    return _SCALARS[tp](key, value)


def _to_union(key: str, tp: Any, value: Any) -> Any:
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


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.lower() in _TRUE_WORDS
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _to_int(key: str, value: Any) -> int:
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


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected a number, got {value!r}") from None


def _to_str(key: str, value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(key, f"expected a string, got {value!r}")


_SCALARS: dict[Any, Callable[[str, Any], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}


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
            raise ConfigError(name, f"is required: set it in the config file or with {flag_of(f)}")
        _check_bounds(name, f.metadata, value)
        values[name] = value
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def read_yaml(path: str | os.PathLike[str], what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping raises UserError naming ``what``."""
    p = storage.display(path)
    if not storage.is_file(path):
        raise UserError(f"{what} {p} does not exist")
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {p} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {p} must hold a mapping of keys to values")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, config_file: bool = True) -> None:
    """Add ``--config`` (unless ``config_file`` is false) and one argument per field of ``cls``.

    Values are validated later, by :func:`resolve`.
    """
    if config_file:
        parser.add_argument("--config", metavar="YAML", help="config file; flags override its keys")
    hints = _field_types(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is dict:
            continue  # sections of a pipeline config: set from YAML or ``--set section.key=value``
        meta = f.metadata
        if meta.get("positional"):
            parser.add_argument(f.name, metavar=meta.get("metavar"), help=meta.get("help", ""))
            continue
        value = _default(f)
        default = "required" if value is dataclasses.MISSING else f"default: {value}"
        help_text = f"{meta.get('help', '')} ({_describe(hints[f.name])}; {default})"
        # A bare boolean flag means true; ``--flag false`` still works (and YAML-like words).
        extra: dict[str, Any] = {"nargs": "?", "const": True} if hints[f.name] is bool else {}
        if meta.get("nargs"):
            extra = {"nargs": meta["nargs"]}
        target: Any = parser
        if meta.get("exclusive"):
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        target.add_argument(
            flag_of(f),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=help_text,
            metavar=meta.get("metavar"),
            **extra,
        )


def apply_overrides(
    cls: type, data: Mapping[str, Any], assignments: Sequence[str]
) -> dict[str, Any]:
    """Apply ``--set section.key=value`` (or ``key=value``) to a mapping of ``cls``; YAML values.

    The sections are the mapping-typed fields of ``cls``.
    """
    hints = _field_types(cls)
    sections = [f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is dict]
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in assignments:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise UserError(f"--set expects KEY=VALUE or SECTION.KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        section, dot, key = name.partition(".")
        if not dot:
            out[name] = value
            continue
        if section not in sections:
            raise UserError(
                f"--set {item}: unknown section {section!r}; choose one of {', '.join(sections)}"
            )
        out[section] = {**(out.get(section) or {}), key: value}
    return out


def resolve(
    cls: type[T],
    args: argparse.Namespace,
    overrides: Sequence[str] = (),
    *,
    name_flags: bool = False,
) -> T:
    """Merge defaults < ``--config`` YAML < command-line flags < ``overrides`` into a valid ``cls``.

    ``overrides`` are ``--set`` assignments (:func:`apply_overrides`). With ``name_flags`` (a
    command without ``--config``, where every value came from a flag) errors name the flag.
    """
    data: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        data.update(read_yaml(config_path))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data.update({k: v for k, v in vars(args).items() if k in fields})
    if overrides:
        data = apply_overrides(cls, data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        if not name_flags:
            raise
        f = fields.get(exc.key)
        flag = flag_of(f) if f is not None else "--" + exc.key.replace("_", "-")
        raise UserError(f"{flag} {str(exc).split(': ', 1)[1]}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (YAML/JSON-able)."""
    return dataclasses.asdict(cfg)


def save(cfg: Any, path: str | os.PathLike[str]) -> str:
    """Write the resolved config as YAML, atomically; returns the path."""
    return atomic.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
