"""Upstream calls in flight for clients: the counts (sans-I/O) and the gate's waiting."""

from __future__ import annotations

import asyncio
import time

import pytest

from chainrelay.errors import UpstreamOverloaded, error_code
from chainrelay.rpc.gate import UpstreamGate
from chainrelay.rpc.inflight import InFlight, Refusal


def test_counts_refuse_past_the_node_bound_first_then_past_the_clients() -> None:
    c = InFlight(node_max=10, client_max=4)
    assert c.take("a", 3) is None
    assert c.take("a", 2) is Refusal.CLIENT  # 5 > 4
    assert c.take("b", 4) is None
    assert c.take("c", 4) is Refusal.NODE  # 11 > 10
    c.give("a", 3)
    assert c.held == {"b": 4} and c.total == 4
    assert c.take("c", 4) is None


def test_a_chunk_larger_than_a_bound_goes_alone() -> None:
    c = InFlight(node_max=10, client_max=4)
    assert c.take("a", 50) is None  # nothing else under way
    assert c.take("b", 1) is Refusal.NODE
    c.give("a", 50)
    assert c.total == 0 and not c.held


async def test_a_client_past_its_bound_waits_for_its_own_calls_first_come_first_served() -> None:
    gate = UpstreamGate(node_max=100, client_max=4)
    deadline = time.perf_counter() + 30
    await gate.enter("a", 4, deadline)
    order: list[str] = []

    async def waiter(name: str, n: int) -> None:
        await gate.enter("a", n, deadline)
        order.append(name)

    first = asyncio.ensure_future(waiter("first", 3))
    second = asyncio.ensure_future(waiter("second", 1))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    assert gate.enter_now("b", 4)  # another client is not held up
    assert not gate.enter_now("a", 1)  # behind its own waiters
    gate.leave("a", 4)
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert gate.counts.held == {"a": 4, "b": 4}


async def test_a_client_still_at_its_bound_at_the_deadline_is_answered_minus_32005() -> None:
    gate = UpstreamGate(node_max=100, client_max=2)
    await gate.enter("a", 2, time.perf_counter() + 30)
    with pytest.raises(UpstreamOverloaded) as got:
        await gate.enter("a", 1, time.perf_counter() + 0.01)
    assert error_code(got.value) == -32005
    assert gate.counts.held == {"a": 2} and not gate._waiting
    gate.leave("a", 2)
    assert gate.counts.total == 0


async def test_the_node_bound_sheds_at_once_and_sheds_a_woken_waiter() -> None:
    gate = UpstreamGate(node_max=4, client_max=2)
    deadline = time.perf_counter() + 30
    await gate.enter("a", 2, deadline)
    await gate.enter("b", 2, deadline)
    with pytest.raises(UpstreamOverloaded, match="node overloaded"):
        await gate.enter("c", 1, deadline)  # no wait: the node is full
    waiting = asyncio.ensure_future(gate.enter("a", 2, deadline))
    await asyncio.sleep(0)
    gate.counts.take("x", 2)  # the room "a" frees is taken meanwhile
    gate.leave("a", 2)
    with pytest.raises(UpstreamOverloaded, match="node overloaded"):
        await waiting
    assert gate.shed == 3


async def test_a_waiter_that_goes_away_gives_its_place_up() -> None:
    gate = UpstreamGate(node_max=100, client_max=2)
    deadline = time.perf_counter() + 30
    await gate.enter("a", 2, deadline)
    gone = asyncio.ensure_future(gate.enter("a", 2, deadline))
    behind = asyncio.ensure_future(gate.enter("a", 1, deadline))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    gate.leave("a", 2)
    await behind
    assert gate.counts.held == {"a": 1} and not gate._waiting
