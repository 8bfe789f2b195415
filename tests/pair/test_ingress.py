"""The ingress in-process, no socket: a real ``Ingress`` over a real ``BatchLog`` (sqlite3 in
tmp_path) and a real ``FeedHub`` with the batch stream, driven by ``Ingress.handle`` with
push messages as a pusher's WebSocket sends them, its JSON answers read back.

Its failure paths: a commit that fails (a real sqlite trigger aborting the insert of one
seq, what a full disk does to a transaction) answers -32047 to that push and everything
queued behind it and rolls the rules back, so the sequencer's push again completes the log
without a gap and the hub sees only durable batches; duplicates older than the hashes held
in memory are the log's to tell; a duplicate of a batch in flight waits for its commit;
``confirmed`` from the sequencer only, and never past the last accepted batch.

To hold a group back, a test takes the log's queue lock (``BatchLog._cond``): its writer
cannot take anything queued until the test lets go, so what is pushed meanwhile is in
flight, and goes to one group.
"""

from __future__ import annotations

import asyncio
import functools
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from chainrelay.batches import frame as batchframe
from chainrelay.batches.frame import CONFIRMED, PUSH, Push
from chainrelay.batches.ingress import (
    CONFLICT,
    GAP,
    MALFORMED,
    NOT_DURABLE,
    SIGNATURE,
    SIGNER,
    TOO_LARGE,
    UNKNOWN_STREAM,
    Ingress,
    specs_of,
)
from chainrelay.batches.log import BatchLog
from chainrelay.config import BatchesConfig, BatchStreamConfig
from chainrelay.metrics import Metrics
from chainrelay.tree import frame as feedframe
from chainrelay.tree.frame import Frame, Signer, keccak
from chainrelay.tree.hub import FeedHub
from chainrelay.tree.streams import BatchStream
from tests.lab.timing import SECOND

S = "arbitrum/batches"
CHAIN = 42161
SEQUENCER = Signer(keccak(b"chainrelay ingress test sequencer"))
STRANGER = Signer(keccak(b"chainrelay ingress test stranger"))
# The hashes held in memory, as few as a pusher may have in flight on one connection: a
# duplicate further back is looked up in the log.
RECENT = 16
MAX_PAYLOAD = 4096
WAIT = 10 * SECOND


def payload(seq: int, variant: int = 0) -> bytes:
    """The sequencer's batch ``seq`` (variant 0), or another payload for the same number."""
    rng = random.Random(f"{seq}/{variant}")
    return rng.randbytes(rng.randrange(1, 1500))


def push(
    seq: int, body: bytes | None = None, *, signer: Signer = SEQUENCER, stream: str = S
) -> bytes:
    body = payload(seq) if body is None else body
    sig = batchframe.sign_batch(signer, CHAIN, stream, seq, body)
    return batchframe.encode_push(Push(PUSH, stream, seq, sig, body))


def confirm(seq: int, *, signer: Signer = SEQUENCER) -> bytes:
    sig = batchframe.sign_confirmed(signer, CHAIN, S, seq)
    return batchframe.encode_push(Push(CONFIRMED, S, seq, sig))


def ack(seq: int) -> dict[str, Any]:
    return {"type": "ack", "stream": S, "seq": seq}


@dataclass
class Node:
    ingress: Ingress
    log: BatchLog
    hub: FeedHub
    metrics: Metrics
    path: Path
    published: list[int]  # seqs the hub took from the ingress, in order

    def send(self, message: bytes) -> asyncio.Future[bytes] | bytes:
        """The answer now (bytes), or its future (started, as a pusher's session starts it)."""
        answer = self.ingress.handle(message)
        return answer if isinstance(answer, bytes) else asyncio.ensure_future(answer)

    async def answer(self, message: bytes) -> dict[str, Any]:
        return await read(self.send(message))

    def count(self, outcome: str) -> float:
        return float(self.metrics.batch_pushes.labels(S, outcome)._value.get())

    @contextmanager
    def held(self) -> Iterator[None]:
        """Nothing queued meanwhile is committed before the block ends."""
        with self.log._cond:
            yield

    @contextmanager
    def refusing(self, seq: int) -> Iterator[None]:
        """Commits of ``seq`` fail inside the block (a real sqlite abort, whole group)."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(
                f"CREATE TRIGGER refuse_{seq} BEFORE INSERT ON batches WHEN NEW.seq = {seq}"
                " BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"
            )
            yield
            conn.execute(f"DROP TRIGGER refuse_{seq}")
        finally:
            conn.close()

    async def logged(self) -> list[tuple[int, bytes]]:
        """(seq, payload) of every batch in the durable log, checked as a subscriber would."""
        frames = await self.log.frames(S, 0, 10_000, 1 << 30)
        out = []
        for raw in frames:
            frame = feedframe.decode(raw, len(raw))
            who, body = batchframe.open_frame(frame, MAX_PAYLOAD)
            assert who == SEQUENCER.address
            out.append((frame.position, body))
        return out


async def read(answer: Awaitable[bytes] | bytes) -> dict[str, Any]:
    if not isinstance(answer, bytes):
        async with asyncio.timeout(WAIT):
            answer = await answer
    msg = orjson.loads(answer)
    assert isinstance(msg, dict)
    return msg


def refusal(msg: dict[str, Any], code: int, seq: int, stream: str = S) -> dict[str, Any]:
    """``msg`` is a refusal of the push (stream, seq) with ``code``: its data."""
    assert msg["type"] == "error", msg
    assert (msg["code"], msg["stream"], msg["seq"]) == (code, stream, seq), msg
    assert msg["message"]
    data = msg.get("data", {})
    assert isinstance(data, dict)
    return data


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    path = tmp_path / "batches.sqlite"
    cfg = BatchesConfig(
        streams=[BatchStreamConfig(S, CHAIN, ["0x" + SEQUENCER.address.hex()], 0)],
        log=str(path),
        api_keys=["k"],
        max_payload_bytes=MAX_PAYLOAD,
        max_in_flight=RECENT,
        recent_hashes=RECENT,
    )
    specs = specs_of(cfg, CHAIN)
    metrics = Metrics()
    hub = FeedHub([], metrics, batches=specs)
    published: list[int] = []
    hub.listeners.append(lambda frame, _source: published.append(frame.position))
    blog = BatchLog(BatchesConfig(log=str(path)))
    ingress = Ingress(cfg, specs, blog, hub, metrics)
    await ingress.start()
    try:
        yield Node(ingress, blog, hub, metrics, path, published)
    finally:
        await ingress.stop()
        await hub.stop()


def batch_stream(node: Node) -> BatchStream:
    st = node.hub.streams[S]
    assert isinstance(st, BatchStream)
    return st


def backlog(node: Node) -> list[Frame]:
    st = node.hub.streams[S]
    return [feedframe.decode(e.raw, len(e.raw)) for e in st.backlog.entries]


# --- a commit that fails ---------------------------------------------------------------------
async def test_a_failed_commit_answers_not_durable_and_the_push_again_completes_the_log(
    node: Node,
) -> None:
    for seq in range(3):
        assert await node.answer(push(seq)) == ack(seq)
    with node.refusing(5):
        with node.held():
            group = [node.send(push(seq)) for seq in (3, 4, 5, 6)]
        # Queued behind the failing group (in it, or in the next: either way not durable).
        behind = [node.send(push(seq)) for seq in (7, 8)]
        for seq, answer in zip(range(3, 9), group + behind, strict=True):
            data = refusal(await read(answer), NOT_DURABLE, seq)
            assert data == {}
        assert node.count("not_durable") == 6
        rules = node.ingress.streams[S].rules
        assert rules.next == 3
        assert node.ingress.streams[S].in_flight == {}
        # Rolled back: the next push is a gap until 3 is pushed again.
        refusal(await node.answer(push(4)), GAP, 4)
    # The sequencer pushes again from its first unacknowledged number, another payload
    # even: nothing was acknowledged for it, so nothing conflicts.
    assert await node.answer(push(3, payload(3, 1))) == ack(3)
    assert await node.log.hash_of(S, 3) == keccak(payload(3, 1))
    assert await node.answer(push(4)) == ack(4)
    answers = [node.send(push(seq)) for seq in range(5, 12)]
    assert [await read(a) for a in answers] == [ack(seq) for seq in range(5, 12)]

    expected = [(seq, payload(seq, 1 if seq == 3 else 0)) for seq in range(12)]
    assert await node.logged() == expected
    # The hub took only durable batches, each once, in order: what the log holds.
    assert node.published == list(range(12))
    assert [(f.position, f.raw) for f in backlog(node)] == [
        (seq, raw)
        for seq, raw in zip(range(12), await node.log.frames(S, 0, 100, 1 << 30), strict=True)
    ]


async def test_a_failed_commit_behind_a_committed_group_rolls_back_to_its_first_seq(
    node: Node,
) -> None:
    with node.refusing(6):
        with node.held():
            first = [node.send(push(seq)) for seq in range(4)]
        assert [await read(a) for a in first] == [ack(seq) for seq in range(4)]
        with node.held():
            second = [node.send(push(seq)) for seq in range(4, 8)]
        for seq, answer in zip(range(4, 8), second, strict=True):
            refusal(await read(answer), NOT_DURABLE, seq)
        assert node.ingress.streams[S].rules.next == 4
    assert node.published == list(range(4))
    assert await node.answer(push(4)) == ack(4)
    assert await node.answer(push(3)) == ack(3)  # a duplicate, durable before the failure
    assert [s for s, _ in await node.logged()] == list(range(5))
    assert node.published == list(range(5))


# --- duplicates ------------------------------------------------------------------------------
async def test_duplicates_older_than_the_hashes_held_are_told_by_the_log(node: Node) -> None:
    answers = [node.send(push(seq)) for seq in range(100)]
    assert [await read(a) for a in answers] == [ack(seq) for seq in range(100)]
    rules = node.ingress.streams[S].rules
    assert rules.hash_of(0) is None and rules.hash_of(99) is not None  # the log's to tell

    assert await node.answer(push(0)) == ack(0)
    assert await node.answer(push(50)) == ack(50)
    data = refusal(await node.answer(push(0, payload(0, 1))), CONFLICT, 0)
    assert data == {"seq": 0}
    # A held one, the same.
    refusal(await node.answer(push(99, payload(99, 1))), CONFLICT, 99)
    assert await node.answer(push(99)) == ack(99)
    assert node.count("duplicate") == 3
    assert node.count("conflict") == 2
    # The first payload stays the batch.
    assert await node.log.hash_of(S, 0) == keccak(payload(0))
    assert await node.logged() == [(seq, payload(seq)) for seq in range(100)]
    assert node.published == list(range(100))


async def test_a_duplicate_of_a_batch_in_flight_is_acked_once_it_is_durable(node: Node) -> None:
    with node.held():
        answers = [node.send(push(seq)) for seq in range(5)]
        dup = node.send(push(2))
        assert isinstance(dup, asyncio.Future)
        await asyncio.sleep(0)  # one loop turn: nothing can be durable yet
        assert not dup.done()
    assert await read(dup) == ack(2)
    assert [await read(a) for a in answers] == [ack(seq) for seq in range(5)]
    assert await node.log.hash_of(S, 2) == keccak(payload(2))


async def test_a_duplicate_of_a_batch_in_flight_is_refused_when_its_commit_fails(
    node: Node,
) -> None:
    assert await node.answer(push(0)) == ack(0)
    with node.refusing(3):
        with node.held():
            answers = [node.send(push(seq)) for seq in range(1, 5)]
            dup = node.send(push(3))
        refusal(await read(dup), NOT_DURABLE, 3)
        for seq, answer in zip(range(1, 5), answers, strict=True):
            refusal(await read(answer), NOT_DURABLE, seq)
    assert await node.answer(push(1)) == ack(1)
    assert [s for s, _ in await node.logged()] == [0, 1]


async def test_a_duplicate_of_an_in_flight_batch_older_than_the_hashes_held_waits(
    node: Node,
) -> None:
    # More in flight than the hashes held: two connections of one sequencer (a reconnect
    # whose old pushes are still in the commit), or POSTs, which max_in_flight does not bound.
    with node.held():
        answers = [node.send(push(seq)) for seq in range(2 * RECENT)]
        dup = node.send(push(0))
        assert isinstance(dup, asyncio.Future)
        # The log's reader answers the lookup while the writer is held: the duplicate must
        # still be waiting when this bound runs out.
        await asyncio.wait([dup], timeout=SECOND)
    assert await read(dup) == ack(0)
    assert [await read(a) for a in answers] == [ack(seq) for seq in range(2 * RECENT)]


# --- confirmed -------------------------------------------------------------------------------
async def test_confirmed_from_the_sequencer_trims_the_backlog_up_to_the_last_accepted(
    node: Node,
) -> None:
    answers = [node.send(push(seq)) for seq in range(10)]
    assert [await read(a) for a in answers] == [ack(seq) for seq in range(10)]
    assert [f.position for f in backlog(node)] == list(range(10))

    assert await node.answer(confirm(6)) == {"type": "confirmed", "stream": S, "seq": 6}
    assert [f.position for f in backlog(node)] == list(range(6, 10))
    confirmed = batch_stream(node).confirmed
    assert confirmed is not None and confirmed[0] == 6

    assert await node.answer(confirm(9)) == {"type": "confirmed", "stream": S, "seq": 9}
    assert [f.position for f in backlog(node)] == [9]

    data = refusal(await node.answer(confirm(10)), GAP, 10)
    assert data == {"expected": 10}
    data = refusal(await node.answer(confirm(8, signer=STRANGER)), SIGNER, 8)
    assert data == {"signer": "0x" + STRANGER.address.hex()}
    confirmed = batch_stream(node).confirmed
    assert confirmed is not None and confirmed[0] == 9
    assert [f.position for f in backlog(node)] == [9]
    assert node.count("confirmed") == 2


# --- answers ---------------------------------------------------------------------------------
async def test_acks_come_in_seq_order_and_refusals_at_once(node: Node) -> None:
    order: list[int] = []
    all_answered = asyncio.Event()

    def answered(seq: int, _fut: asyncio.Future[Any]) -> None:
        order.append(seq)
        if len(order) == 300:
            all_answered.set()

    answers = []
    for seq in range(300):
        answer = node.send(push(seq))
        assert isinstance(answer, asyncio.Future)
        answer.add_done_callback(functools.partial(answered, seq))
        answers.append(answer)
        if seq % 50 == 25:
            # Refused while acks are pending: answered now, not behind them.
            refused = node.send(push(seq + 7))
            assert isinstance(refused, bytes)
            assert refusal(await read(refused), GAP, seq + 7) == {"expected": seq + 1}
        if seq % 37 == 0:
            await asyncio.sleep(0)  # let some groups commit meanwhile
    assert [await read(a) for a in answers] == [ack(seq) for seq in range(300)]
    async with asyncio.timeout(WAIT):
        await all_answered.wait()
    assert order == list(range(300))
    assert node.log.commits < 300  # the acks above came from group commits


async def test_each_refusal_names_the_pushs_stream_and_seq(node: Node) -> None:
    assert await node.answer(push(0)) == ack(0)
    other = "arbitrum/elsewhere"
    refusal(await node.answer(push(3, stream=other)), UNKNOWN_STREAM, 3, other)
    big = bytes(MAX_PAYLOAD + 1)
    assert refusal(await node.answer(push(1, big)), TOO_LARGE, 1) == {"limit": MAX_PAYLOAD}
    data = refusal(await node.answer(push(1, signer=STRANGER)), SIGNER, 1)
    assert data == {"signer": "0x" + STRANGER.address.hex()}
    unreadable = batchframe.encode_push(Push(PUSH, S, 1, b"\xff" * 65, payload(1)))
    refusal(await node.answer(unreadable), SIGNATURE, 1)
    refusal(await node.answer(b"\x01\x00"), MALFORMED, 0, "")
    assert await node.answer(push(1)) == ack(1)
    assert node.published == [0, 1]
