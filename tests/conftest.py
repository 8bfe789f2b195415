"""Fixtures shared by every tier. System fixtures start real processes and stop them by PID."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypedDict, Unpack

import pytest

from chainrelay.devnet import Anvil
from tests.lab.procs import AnvilFactory, Procs, Relay, RelayFactory, relay_config
from tests.lab.timing import SECOND


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.close()


class AnvilArgs(TypedDict, total=False):
    """Anvil's keyword arguments."""

    chain_id: int
    block_time: float | None
    host: str
    port: int | None
    extra: list[str] | None


@pytest.fixture
def anvil_factory(procs: Procs) -> AnvilFactory:
    """Start an anvil node: ``await anvil_factory(chain_id=56, block_time=1.0)``."""

    async def make(**kw: Unpack[AnvilArgs]) -> Anvil:
        node = Anvil(**kw)
        procs.anvils.append(node)
        node.start()
        await node.wait_ready(20 * SECOND)
        return node

    return make


@pytest.fixture
async def anvil(anvil_factory: AnvilFactory) -> AsyncIterator[Anvil]:
    """A BSC-like anvil (chain id 56) mining a block every second."""
    yield await anvil_factory(chain_id=56, block_time=1.0)


@pytest.fixture
def relay_factory(procs: Procs, tmp_path: Path) -> RelayFactory:
    """Start a relay process: ``await relay_factory([upstream_url, ...], extra_toml)``."""

    async def make(
        upstreams: list[str], extra: str = "", name: str = "relay", each_upstream: str = ""
    ) -> Relay:
        relay = Relay(procs, relay_config(upstreams, extra, each_upstream), tmp_path, name)
        relay.start()
        await relay.wait_ready()
        return relay

    return make


# The suite promises 0 skips on any clone: every corpus and every real process it needs is
# in the repository or installed by tests/run. A skip is a promise broken silently, so it
# fails the run (CHAINRELAY_ALLOW_SKIPS=1 lifts this for a developer's partial run).
ALLOW_SKIPS = os.environ.get("CHAINRELAY_ALLOW_SKIPS") == "1"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and not ALLOW_SKIPS and exitstatus == pytest.ExitCode.OK:
        if reporter is not None:
            reporter.write_line(f"{skipped} test(s) skipped: the suite allows none", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
