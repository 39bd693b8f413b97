"""Typed sections: a mapping of YAML values parsed into a dataclass, with gentle coercion and a
"did you mean" for unknown keys. The experiment config (:mod:`vitdistill.config`) and every method's
``params`` (:mod:`vitdistill.methods`) are parsed by the same code, so both give the same errors."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from .errors import VitdistillError

__all__ = ["ConfigError", "check", "parse_section"]


class ConfigError(VitdistillError, ValueError):
    """A user-facing configuration problem; the message names the bad value and what is valid."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(tp: Any) -> str:
    """What a YAML value of type ``tp`` looks like, for error messages."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {' or '.join(_describe(arg) for arg in args)}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {sorted(_field_types(tp))}, got {value!r}")
        return parse_section(tp, value, where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def parse_section(cls: type, values: dict[str, Any], where: str) -> Any:
    types_ = _field_types(cls)
    for key in values:
        if key not in types_:
            close = difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            prefix = f"{where}." if where else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} valid keys: {sorted(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)
