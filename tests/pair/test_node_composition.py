"""A node's capabilities, composed: started in order, stopped in reverse, every stop run even
when one fails, the failures raised as one group.

Pair tier: a real node (memory cache, no tree) in front of the recorded-corpus fake upstream,
both in this process on loopback. The services' stops are wrapped to record their order.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from chainrelay.app import Node
from chainrelay.chain.follower import BlockFollower
from chainrelay.chain.head import HeadTracker
from chainrelay.config import Config, quick
from chainrelay.errors import StopFailed
from chainrelay.server.http import HttpServer
from chainrelay.subscriptions.filters import FilterService
from chainrelay.subscriptions.service import SubscriptionService
from chainrelay.upstreams.pool import UpstreamPool
from tests.lab.recorded_upstream import make_app, recordings_for

# What a node without tree, batches or Redis starts, in order; it stops them in reverse.
SERVICES: dict[str, Any] = {
    "pool": UpstreamPool,
    "head": HeadTracker,
    "follower": BlockFollower,
    "filters": FilterService,
    "subscriptions": SubscriptionService,
    "server": HttpServer,
}


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    runner = web.AppRunner(make_app(recordings_for("execution-apis")))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def record_stops(
    monkeypatch: pytest.MonkeyPatch, journal: list[str], failing: frozenset[str] = frozenset()
) -> None:
    """Each service's stop notes its name (after doing its work), and those in ``failing``
    then raise."""
    for name, cls in SERVICES.items():
        original: Callable[..., Awaitable[None]] = cls.stop

        def make(name: str, original: Callable[..., Awaitable[None]]) -> Callable[..., object]:
            async def stop(self: object) -> None:
                await original(self)
                journal.append(name)
                if name in failing:
                    raise RuntimeError(f"{name} failed to stop")

            return stop

        monkeypatch.setattr(cls, "stop", make(name, original))


def config(upstream: str) -> Config:
    """``serve --upstream``'s config on a free port, with no admin listener: its fixed
    default port is no test's to take."""
    cfg = quick([upstream], "127.0.0.1:0")
    cfg.server.admin_listen = ""
    return cfg


def refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_a_node_stops_its_capabilities_in_reverse_order_of_start(
    upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal: list[str] = []
    record_stops(monkeypatch, journal)
    node = Node(config(upstream))
    await node.start()
    port = node.port
    assert journal == []
    await node.stop()
    assert journal == list(reversed(SERVICES))
    assert refuses(port)


async def test_every_stop_runs_and_the_failures_come_out_as_one_group(
    upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal: list[str] = []
    record_stops(monkeypatch, journal, frozenset({"subscriptions", "pool"}))
    node = Node(config(upstream))
    await node.start()
    port = node.port
    with pytest.raises(StopFailed) as exc:
        await node.stop()
    assert journal == list(reversed(SERVICES))
    assert [str(e) for e in exc.value.exceptions] == [
        "subscriptions failed to stop",
        "pool failed to stop",
    ]
    assert refuses(port)
    await node.stop()  # stopped once: nothing runs twice
    assert journal == list(reversed(SERVICES))
