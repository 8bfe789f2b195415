"""eth_getLogs split around the held blocks (chain/locallogs.py), in memory, where the
upstream's part goes wrong: the answer is then the upstream's error, or the window is asked
whole; never a partial answer, never one spliced across two forks.

Pair tier: a real LocalLogs and LogStore over a head view the test moves, asking a fake
upstream for the sub-ranges (a node cannot be made to fail one sub-range, answer one from
another fork, or hold one while the chain reorgs). The splice itself, against anvil's own
answers, is tests/system/test_local_logs.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import orjson
import pytest

from chainrelay.chain.locallogs import LocalLogs
from chainrelay.chain.logstore import LogStore
from chainrelay.config import CacheConfig, FiltersConfig
from chainrelay.errors import UpstreamError
from chainrelay.metrics import Metrics
from chainrelay.rpc.policy import Params
from chainrelay.subscriptions.logfilter import LogFilter
from chainrelay.wire.jsonrpc import Answer
from tests.protocol.test_logstore import Chain, block_hash, block_logs

TOO_MANY = b'{"code":-32005,"message":"query returned more than 10000 results"}'


class FakeUpstream:
    """Answers eth_getLogs sub-ranges with the matching logs of its blocks (of the fork
    ``forks`` names, else "a"), an error for ranges starting at a block ``errors`` lists;
    records what it was asked; with ``hold`` set, waits for ``go`` first."""

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []
        self.errors: dict[int, bytes] = {}  # fromBlock -> error
        self.forks: dict[int, str] = {}
        self.hold = False
        self.go = asyncio.Event()
        self.called = asyncio.Event()

    async def ask(self, method: str, params: Params) -> Answer:
        assert method == "eth_getLogs" and isinstance(params, list)
        flt = params[0]
        self.asked.append(flt)
        self.called.set()
        if self.hold:
            await self.go.wait()
        low, high = int(flt["fromBlock"], 16), int(flt["toBlock"], 16)
        if low in self.errors:
            return Answer(None, self.errors[low])
        match = LogFilter.parse(flt).matches
        logs = [
            x
            for n in range(low, high + 1)
            for x in block_logs(n, self.forks.get(n, "a"))
            if match(x)
        ]
        return Answer(orjson.dumps(logs), None)


def local_logs(chain: Chain, upstream: FakeUpstream, held: Iterable[int]) -> LocalLogs:
    store = LogStore(chain.view, 1 << 30)
    for n in held:
        assert store.hold(n, block_hash(n), block_logs(n))
    return LocalLogs(store, upstream.ask, Metrics(), CacheConfig(), FiltersConfig())


def window(low: int, high: int) -> list[Any]:
    return [{"fromBlock": hex(low), "toBlock": hex(high)}]


async def test_the_held_runs_and_a_fake_upstream_s_sub_ranges_splice_in_block_order() -> None:
    chain = Chain(number=100, finalized=90)
    upstream = FakeUpstream()
    local = local_logs(chain, upstream, range(85, 101))
    # 80..84 asked upstream, 85..100 held; an address in any case, as the caller gave it.
    got = await local.answer(
        [
            {
                "fromBlock": "0x50",
                "toBlock": "0x64",
                "address": "0xE7F1725E7734CE288F8367E1BB143E90BB3F0512",
            }
        ]
    )
    assert upstream.asked == [
        {
            "fromBlock": "0x50",
            "toBlock": "0x54",
            "address": "0xE7F1725E7734CE288F8367E1BB143E90BB3F0512",
        }
    ]
    assert got is not None and got.error is None
    assert orjson.loads(got.result or b"") == [
        x for n in range(80, 101) for x in block_logs(n) if x["address"].startswith("0xe7f1")
    ]


async def test_a_sub_range_error_from_a_fake_upstream_is_the_whole_answer() -> None:
    chain = Chain(number=100, finalized=90)
    upstream = FakeUpstream()
    local = local_logs(chain, upstream, [*range(85, 90), *range(92, 101)])
    upstream.errors[90] = TOO_MANY
    got = await local.answer(window(80, 100))
    assert got == Answer(None, TOO_MANY)
    # Both sub-ranges failing: the first in block order, as the window asked whole.
    upstream.errors[80] = b'{"code":-32000,"message":"first"}'
    got = await local.answer(window(80, 100))
    assert got == Answer(None, b'{"code":-32000,"message":"first"}')


async def test_a_sub_range_a_fake_upstream_fails_to_answer_raises_for_the_whole_window() -> None:
    chain = Chain(number=100, finalized=90)

    async def down(method: str, params: Params) -> Answer:
        raise UpstreamError("no upstream answered", upstream="u0")

    store = LogStore(chain.view, 1 << 30)
    for n in range(90, 101):
        store.hold(n, block_hash(n), block_logs(n))
    local = LocalLogs(store, down, Metrics(), CacheConfig(), FiltersConfig())
    with pytest.raises(UpstreamError):
        await local.answer(window(80, 100))


async def test_a_fake_upstream_answering_a_sub_range_from_another_fork_sends_the_window_whole() -> (
    None
):
    chain = Chain(number=100, finalized=80)
    upstream = FakeUpstream()
    local = local_logs(chain, upstream, range(90, 101))
    upstream.forks[88] = "b"  # the upstream lags on a fork this node saw replaced
    assert await local.answer(window(85, 100)) is None
    upstream.forks.clear()
    upstream.asked.clear()
    got = await local.answer(window(85, 100))
    assert got is not None and orjson.loads(got.result or b"") == [
        x for n in range(85, 101) for x in block_logs(n)
    ]


async def test_a_reorg_of_a_held_block_while_a_fake_upstream_holds_a_sub_range() -> None:
    chain = Chain(number=100, finalized=80)
    upstream = FakeUpstream()
    local = local_logs(chain, upstream, range(90, 101))
    upstream.hold = True
    answer = asyncio.ensure_future(local.answer(window(85, 100)))
    await upstream.called.wait()
    chain.reorg(95, "b")  # 95..100 held as fork "a": their logs are no longer the chain's
    upstream.go.set()
    assert await answer is None


async def test_odd_params_and_unresolved_tags_are_left_to_the_upstream() -> None:
    chain = Chain(number=100, finalized=90)
    upstream = FakeUpstream()
    local = local_logs(chain, upstream, range(90, 101))
    for params in (
        None,
        [],
        [{"fromBlock": "0x5a"}, {}],
        ["0x5a"],
        [{"fromBlock": "0x5a", "toBlock": "pending"}],
        [{"fromBlock": "0x5a", "toBlock": "0x64", "topics": [None] * 5}],
        [{"fromBlock": "0x5a", "toBlock": "0x64", "address": "0x1234"}],
        [{"blockHash": block_hash(89)}],  # not held
    ):
        assert await local.answer(params) is None, params
    assert upstream.asked == []


async def test_windows_not_wholly_held_are_told_for_the_recent_window_s_fill() -> None:
    chain = Chain(number=100, finalized=90)
    upstream = FakeUpstream()
    store = LogStore(chain.view, 1 << 30)
    for n in range(90, 101):
        assert store.hold(n, block_hash(n), block_logs(n))
    told: list[tuple[int, int]] = []
    local = LocalLogs(
        store,
        upstream.ask,
        Metrics(),
        CacheConfig(),
        FiltersConfig(),
        unheld=lambda low, high: told.append((low, high)),
    )
    assert await local.answer(window(92, 100)) is not None  # wholly held
    await local.answer(window(85, 100))  # split: 85..89 asked upstream
    await local.answer(window(40, 60))  # nothing held there: asked whole
    assert told == [(85, 100), (40, 60)]
