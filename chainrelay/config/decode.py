"""The first steps of loading: ``${ENV}`` expansion in string values, then a strict decode
of TOML tables into the section dataclasses (an unknown key is an error naming its path).

Decoding knows nothing of any section: it reads each dataclass's field types, so a
section's keys are written once, as its fields.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any

from chainrelay.errors import ConfigError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, env: typing.Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` (or ``${NAME:-default}``) with the environment's value."""
    environ = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set")

    return _ENV.sub(sub, text)


def expand_values(data: Any, env: typing.Mapping[str, str] | None, path: str = "") -> Any:
    """Expand ``${ENV}`` inside string values only, so comments may mention variables."""
    if isinstance(data, str):
        try:
            return expand_env(data, env)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if isinstance(data, dict):
        return {k: expand_values(v, env, f"{path}.{k}" if path else k) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_values(v, env, f"{path}[{i}]") for i, v in enumerate(data)]
    return data


def decode(cls: type, data: Any, path: str = "") -> Any:
    """An instance of the dataclass ``cls`` from the table ``data``; keys it leaves out keep
    their field defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key {where!r}")
    kwargs = {k: _value(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _value(tp: Any, v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return decode(tp, v, path)  # type: ignore[arg-type]
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(v, list):
            raise ConfigError(f"{path}: expected an array")
        return [_value(inner, x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin is dict:  # a table of tables named by the operator: [tiers.<name>]
        _key, inner = typing.get_args(tp)
        if not isinstance(v, dict):
            raise ConfigError(f"{path}: expected a table")
        return {k: _value(inner, x, f"{path}.{k}") for k, x in v.items()}
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"{path}: unsupported type")  # pragma: no cover
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp in (int, float, str, bool) and (type(v) is not tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(v).__name__}")
    return v
