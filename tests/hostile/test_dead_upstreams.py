"""Dead upstreams: every call ends by its deadline, then fails fast, and the node recovers.

An upstream that hangs, drips a byte every half second, or closes in the middle of its
answer is faked by ``tests.lab.fault_upstream`` (a real node cannot be made to), switched
to the fault for every call (its head, chain id and probes included: a dead node) once the
relay is up, and back to healthy with ``POST /mode``. The relay's deadline is short here
(``DEADLINE``) so the module stays quick; each call's duration is measured and held to
the deadline within ``TOLERANCE``. Meanwhile a well-behaved client (``Bystander``) asking
``eth_chainId`` must not notice: the chain id never needs an upstream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chainrelay.devnet import DEV_ACCOUNTS, Anvil
from tests.lab.counting_proxy import start_proxy
from tests.lab.fault_upstream import start_fault_upstream
from tests.lab.hostile import ATTACK_RSS_GROWTH, BYSTANDER_P99, Bystander, Rss
from tests.lab.procs import Procs, Relay, RelayFactory, until
from tests.lab.timing import SECOND
from tests.system.test_ws_upstream import stop_process

pytestmark = pytest.mark.lab

# A call's deadline in these tests, and how far from it a call may end: a call that waits
# on a dead upstream ends at the deadline, never later, and not much sooner.
DEADLINE = 2.0 * SECOND
TOLERANCE = 0.10
PROBE_INTERVAL = 1.0 * SECOND
# "Well under the deadline": a call refused because no upstream is in rotation.
FAIL_FAST = 0.1 * DEADLINE
# A loaded machine may run a timer or a request late by this much.
LATE = 0.5 * SECOND
POOL = f"[pool]\ndeadline = {DEADLINE}\nprobe_interval = {PROBE_INTERVAL}\n"
HEADERS = {"Content-Type": "application/json"}


async def timed_call(
    s: aiohttp.ClientSession, url: str, method: str, params: list[Any], rid: int = 1
) -> tuple[float, dict[str, Any]]:
    """(seconds until the whole answer was read, the answer)."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
    started = time.perf_counter()
    async with s.post(url, data=body, headers=HEADERS) as r:
        assert r.status == 200, f"HTTP {r.status}"
        doc: dict[str, Any] = orjson.loads(await r.read())
    return time.perf_counter() - started, doc


async def health(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
        return r.status, orjson.loads(await r.read())


def reads() -> list[tuple[str, list[Any]]]:
    """Reads that are never cached: each one goes to the upstream."""
    return [("eth_getBalance", [a, "pending"]) for a in DEV_ACCOUNTS[:3]] + [
        ("eth_getTransactionCount", [DEV_ACCOUNTS[0], "pending"])
    ]


def code(doc: dict[str, Any]) -> int | None:
    error = doc.get("error")
    return error.get("code") if isinstance(error, dict) else None


def assert_bounded(relay: Relay, rss: Rss, bystander: Bystander) -> None:
    assert bystander.p99() < BYSTANDER_P99, bystander.summary()
    assert bystander.failures == 0, bystander.summary()
    assert rss.growth() < ATTACK_RSS_GROWTH, rss.growth()
    assert relay.proc is not None and relay.proc.poll() is None


@pytest.mark.parametrize("mode", ["hang", "drip", "close_mid_answer"])
async def test_fake_dead_upstream_calls_end_by_their_deadline_then_fail_fast_then_recover(
    mode: str,
    procs: Procs,
    anvil: Anvil,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    fake = await start_fault_upstream(procs, "healthy", anvil.url, tmp_path / "fake.log")
    relay = await relay_factory([fake.url], POOL)
    assert relay.proc is not None
    rss = Rss(relay.proc.pid)
    async with aiohttp.ClientSession() as s, Bystander(relay.url) as bystander:
        took, doc = await timed_call(s, relay.url, *reads()[0])
        assert "result" in doc, doc
        await fake.set_mode(mode, every=True)

        # Reads and a write at once: each ends by its one deadline, whatever its tries.
        calls = [*reads(), ("eth_sendRawTransaction", ["0x00"])]
        got = await asyncio.gather(
            *(timed_call(s, relay.url, m, p, i) for i, (m, p) in enumerate(calls))
        )
        for took, doc in got:
            assert took <= DEADLINE * (1 + TOLERANCE), (took, doc)
            if mode == "close_mid_answer":  # fails at once, tried again: no answer at all
                assert code(doc) in (-32001, -32002), doc
            else:  # waits out the deadline, with the node's timeout error
                assert code(doc) == -32002, doc
                assert took >= DEADLINE * (1 - TOLERANCE), (took, doc)

        # Out of rotation now: calls are refused at once, and /health says so.
        async def out() -> bool:
            status, body = await health(relay.url)
            return status == 503 and not body["upstreams"][0]["healthy"]

        await until(out, DEADLINE + 5 * SECOND, "the dead upstream out of rotation")
        for i, (method, params) in enumerate(reads()):
            took, doc = await timed_call(s, relay.url, method, params, i)
            assert took < FAIL_FAST, (took, doc)
            assert code(doc) == -32001 and doc["error"]["message"] == "no upstream in rotation"

        # The head's number is never made up: once stale, it is asked for, and refused.
        async def block_number_refused() -> bool:
            _, doc = await timed_call(s, relay.url, "eth_blockNumber", [])
            return "error" in doc

        await until(block_number_refused, 10 * SECOND, "eth_blockNumber refused")
        took, doc = await timed_call(s, relay.url, "eth_blockNumber", [])
        assert took < FAIL_FAST and code(doc) == -32001, (took, doc)
        took, doc = await timed_call(s, relay.url, "eth_chainId", [])
        assert doc["result"] == "0x38" and took < FAIL_FAST, (took, doc)

        # Healed: back within one probe interval.
        await fake.set_mode("healthy")
        healed = time.perf_counter()

        async def answered() -> bool:
            _, doc = await timed_call(s, relay.url, *reads()[0])
            return "result" in doc

        await until(answered, PROBE_INTERVAL + 5 * SECOND, "calls answered again")
        recovered = time.perf_counter() - healed
        assert recovered <= PROBE_INTERVAL + LATE, recovered
    assert_bounded(relay, rss, bystander)


async def test_fake_429_storm_upstream_stays_in_rotation_and_calls_end_by_the_deadline(
    procs: Procs, anvil: Anvil, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    fake = await start_fault_upstream(procs, "healthy", anvil.url, tmp_path / "fake.log")
    relay = await relay_factory([fake.url], POOL + "max_consecutive_errors = 2\n")
    assert relay.proc is not None
    rss = Rss(relay.proc.pid)
    async with aiohttp.ClientSession() as s, Bystander(relay.url) as bystander:
        # Every read but the head's (the provider limits the heavy calls of a key).
        await fake.set_mode("429_storm")
        for round_ in range(3):
            got = await asyncio.gather(
                *(timed_call(s, relay.url, m, p, i) for i, (m, p) in enumerate(reads()))
            )
            for took, doc in got:
                assert took <= DEADLINE * (1 + TOLERANCE), (round_, took, doc)
                assert code(doc) == -32001 and "429" in doc["error"]["message"], doc
        status, body = await health(relay.url)
        assert status == 200 and body["upstreams"][0]["healthy"], body
        assert await fake.fault_calls() >= len(reads())  # met, not dodged

        await fake.set_mode("healthy")
        took, doc = await timed_call(s, relay.url, *reads()[0])
        assert "result" in doc and took <= DEADLINE, (took, doc)
    assert_bounded(relay, rss, bystander)


async def test_fake_hanging_upstream_beside_a_real_one_calls_still_succeed_in_the_deadline(
    procs: Procs, anvil: Anvil, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    fake = await start_fault_upstream(procs, "healthy", anvil.url, tmp_path / "fake.log")
    # The real node is reached 200 ms later than the fake, so the relay (which orders
    # upstreams by latency) meets the dead one first. Tries of 0.4 deadlines: a second one
    # fits (as the default 5 s tries do in the default 10 s deadline).
    slow = await start_proxy(procs, anvil.url, delay_ms=200, log_path=tmp_path / "proxy.log")
    relay = await relay_factory([fake.url, slow.url], POOL + f"timeout = {0.4 * DEADLINE}\n")
    assert relay.proc is not None
    rss = Rss(relay.proc.pid)
    async with aiohttp.ClientSession() as s, Bystander(relay.url) as bystander:
        await fake.set_mode("hang", every=True)
        for round_ in range(3):
            got = await asyncio.gather(
                *(timed_call(s, relay.url, m, p, i) for i, (m, p) in enumerate(reads()))
            )
            for took, doc in got:
                assert "result" in doc, (round_, doc)
                assert took <= DEADLINE, (round_, took)
        assert await fake.fault_calls() >= 1
        status, body = await health(relay.url)
        assert status == 200, body
        assert [u["healthy"] for u in body["upstreams"]] == [False, True], body
    assert_bounded(relay, rss, bystander)


async def test_hung_ws_node_a_forwarded_call_and_its_retry_share_one_deadline(
    anvil: Anvil, relay_factory: RelayFactory
) -> None:
    # A real node, stopped: connected and silent. The forwarded try waits its timeout
    # (0.6 deadlines), the retry on the full path only what is left of the same deadline.
    try_timeout = 0.6 * DEADLINE
    relay = await relay_factory([anvil.ws_url], POOL + f"timeout = {try_timeout}\nhedge = false\n")
    call = ("eth_getBalance", [DEV_ACCOUNTS[1], "pending"])
    async with aiohttp.ClientSession() as s:
        took, doc = await timed_call(s, relay.url, *call)
        assert "result" in doc, doc
        assert anvil.proc is not None
        await stop_process(anvil.proc.pid)
        try:
            took, doc = await timed_call(s, relay.url, *call)
        finally:
            os.kill(anvil.proc.pid, signal.SIGCONT)
        assert code(doc) == -32002, doc
        # The forwarded try and the full path's: one more, or two when the first of them
        # ended early enough (a loaded machine's timers fire late or a link fails early).
        assert doc["error"]["data"]["attempts"] in (2, 3), doc
        assert DEADLINE * (1 - TOLERANCE) <= took <= DEADLINE * (1 + TOLERANCE), took
