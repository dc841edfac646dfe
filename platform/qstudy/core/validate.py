"""YAML mappings validated into dataclasses: unknown, missing and mistyped keys are named by their dotted path."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from qstudy.core.errors import ConfigError, Problems


def check_at_least(section: str, obj: Any, **minimums: int | float) -> None:
    """Each named field of ``obj`` is ``None`` (where its type allows) or at least its minimum; all that are not are named."""
    problems = Problems()
    for name, minimum in minimums.items():
        value = getattr(obj, name)
        if value is not None and value < minimum:
            problems.add(f"{section}.{name} must be >= {minimum}, got {value}")
    problems.raise_any()


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation, converting nested mappings to dataclasses.

    ``Annotated[T, read]`` is read by ``read(value, where)``: a type that stands for several
    (a method's config, chosen by its ``method`` key) names its own reader.
    """
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Annotated:
        _, read = typing.get_args(annotation)[:2]
        return read(value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        problems, items = Problems(), []
        for i, item in enumerate(value):
            with problems.check():
                items.append(coerce(item, item_type, f"{where}[{i}]"))
        problems.raise_any()
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, where)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan and .inf: no setting means either
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported annotation {annotation!r}")


def from_mapping(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown and missing keys by name.

    Every unknown, missing and mistyped key is reported, in one :class:`ConfigError`; the
    dataclass's own checks (``__post_init__``) run once the keys are right.
    """
    prefix = f"{where}." if where else ""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = Problems()
    for name in sorted(set(data) - set(fields)):
        problems.add(f"unknown key {prefix}{name} (allowed: {', '.join(sorted(fields))})")
    values = {}
    for name, spec in fields.items():
        if name in data:
            with problems.check():
                values[name] = coerce(data[name], hints[name], f"{prefix}{name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            problems.add(f"missing key {prefix}{name}")
    problems.raise_any()
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {error}") from error


def to_mapping(obj: Any) -> Any:
    """The inverse of :func:`from_mapping`: plain dicts and lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        write = getattr(obj, "to_mapping", None)
        return write() if write else field_mapping(obj)
    if isinstance(obj, (list, tuple)):
        return [to_mapping(item) for item in obj]
    if isinstance(obj, dict):
        return {key: to_mapping(value) for key, value in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def field_mapping(obj: Any) -> dict[str, Any]:
    """A dataclass's init fields as plain values: what :func:`to_mapping` gives a dataclass that does not write itself."""
    return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, naming the file in every error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
