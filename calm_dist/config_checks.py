"""Typed parsing and single-field checks of the config dataclasses (calm_dist/config.py): a value checked against
its field's annotation, a section built from a mapping with unknown keys refused, and the range and choice checks
each section's __post_init__ calls. Every failure is a ConfigError: one line, exit code 2."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration that cannot work; reported as one line, exit code 2, before any heavy work."""


# Single-field checks, called from each section's __post_init__; None (unset) always passes. The comparisons
# are written so that NaN fails them too (a section built in code skips the loader's finiteness check).
def at_least(key: str, value, low) -> None:
    if value is not None and not value >= low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def above(key: str, value, low) -> None:
    if value is not None and not value > low:
        raise ConfigError(f"{key} must be > {low}, got {value}")


def within(key: str, value, low, high, *, high_open: bool = False) -> None:
    if value is None:
        return
    if not (low <= value < high if high_open else low <= value <= high):
        raise ConfigError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


def check_choices(section: str, obj) -> None:
    """Each field of the section `obj` annotated `Literal[...]` (or `Literal[...] | None`) holds one of its
    choices: the annotation is the one list of them."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = literal_choices(hints[f.name])
        value = getattr(obj, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{section}.{f.name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def literal_choices(annotation) -> tuple | None:
    """The values a `Literal[...]` annotation allows (None among them for `Literal[...] | None`); None for any
    other annotation."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if literals and all(a is type(None) or typing.get_origin(a) is Literal for a in args):
            return tuple(c for a in literals for c in typing.get_args(a)) + ((None,) if type(None) in args else ())
    return None


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` as `annotation`, or raise ConfigError naming `where`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_type(value, arg, where)
            except ConfigError as e:
                errors.append((arg, str(e)))
        # the error of the member shaped like the value (a list for a list), not "expected a string"
        shaped = [e for arg, e in errors if (typing.get_origin(arg) is list) == isinstance(value, (list, tuple))]
        raise ConfigError((shaped or [e for _, e in errors])[0])
    if origin is Literal:  # the section's __post_init__ checks the choices (check_choices)
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # no field means anything by inf or nan
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def build_dataclass(cls, data: Any, where: str = ""):
    """An instance of the dataclass `cls` from a mapping: unknown keys refused, each value checked against its
    field's annotation (check_type); the class's __post_init__ then checks ranges and choices."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(prefix + n for n in names))})")
    kwargs = {k: check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)
