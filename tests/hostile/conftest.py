"""Hostile-client fixtures: the system tier's, a relay in its own process per test."""

from __future__ import annotations

from tests.system.conftest import collect_garbage

__all__ = ["collect_garbage"]
