"""System-tier fixtures."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Collect garbage as each system test ends, so an object it left unclosed (an aiohttp
    session, a never-awaited task) fails that test rather than whichever test the collector
    happens to run in next. A full collection takes milliseconds; a system test, seconds."""
    yield
    gc.collect()
