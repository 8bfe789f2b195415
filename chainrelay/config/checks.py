"""The one way a config section states and checks a rule.

A bound that must be above zero is declared where its field is, ``x: int = positive(d.X)``,
and checked by ``check_fields`` with the one message every such key gets; any other rule is
a ``require(condition, message)`` in the section's ``check``. Both raise ``ConfigError``
naming the key path, so ``chainrelay validate`` points at the line to fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from chainrelay.errors import ConfigError

T = TypeVar("T", int, float)

_RULE = "rule"
_POSITIVE = "positive"


def positive(default: T) -> T:
    """A field whose value must be above zero; ``default`` comes from ``defaults.py``."""
    return dataclasses.field(default=default, metadata={_RULE: _POSITIVE})


def check_fields(section: Any, path: str) -> None:
    """Every ``positive`` field of ``section`` (a dataclass), in declaration order."""
    for f in dataclasses.fields(section):
        if f.metadata.get(_RULE) == _POSITIVE and getattr(section, f.name) <= 0:
            raise ConfigError(f"{path}.{f.name}: must be positive")


def require(ok: bool, message: str) -> None:
    """Refuse the config with ``message`` (which names the key path) unless ``ok``."""
    if not ok:
        raise ConfigError(message)
