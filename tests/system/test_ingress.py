"""The batch ingress as a sequencer and its relays see it, with real processes: anvil as
Arbitrum's chain (42161) upstream, chainrelay nodes with a ``[batches]`` section (ingress
nodes with a durable log and an API key; relays fed by them over the feed), pushed to by
the publisher library or by raw WebSocket and HTTP clients.

What a node holds is read back through ``GET /feed/range`` and checked end to end (the
sequencer's signature in each frame, consecutive seqs, the payload that was pushed).
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from chainrelay.batches.frame import PUSH, Push, decode_push, encode_push, sign_batch
from chainrelay.clients.batchsubscriber import BatchSubscription, FeedBatch
from chainrelay.clients.publisher import Ack, Publisher, generated_payload
from chainrelay.errors import PublishRefused
from chainrelay.tree.frame import Signer, keccak
from tests.lab.batches import (
    API_KEY,
    CHAIN_ID,
    SEQUENCER_HEX,
    SEQUENCER_KEY,
    STREAM,
    check_batches,
    children,
    payload_of,
    pushes,
    range_status,
    read_batches,
    read_range,
    start_ingress,
)
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., Awaitable[Relay]]
AnvilFactory = Callable[..., Awaitable[Any]]

# Batches cross one or two node processes and may be read back through range requests that
# climb to an ingress: seconds on a loaded two-core machine, not milliseconds.
HOP_TIMEOUT = 30 * SECOND


async def kill(node: Relay) -> None:
    assert node.proc is not None
    node.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(node.proc.wait)


async def restart(node: Relay) -> None:
    """The same process again: its port, config and durable log."""
    node.start()
    await node.wait_ready()


def restored_next(node: Relay) -> list[int]:
    """Each start's 'next batch' of the stream, from the node's log: where the ingress
    picked up from its durable log."""
    text = node.log_path.read_text(errors="replace")
    return [int(n) for n in re.findall(rf"ingress of {STREAM}: next batch (\d+)", text)]


# --- 1. crash safety --------------------------------------------------------------------------
CRASH_BATCHES = 10_000
CRASH_SIZE = 2048
CRASH_SEED = 20_261_126
CRASH_KILLS = 3
# Batches submitted ahead of the acknowledgements: well past the publisher's window, so the
# node always has a pipeline full when it is killed.
CRASH_LEAD = 2000


async def test_ingress_sigkilled_three_times_during_10000_pushes_loses_nothing_acked(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    (node,) = (await start_ingress(anvil_factory, relay_factory, tmp_path)).ingresses
    rng = random.Random(CRASH_SEED)
    # One kill point drawn in each third of the stream, CRASH_LEAD + 500 apart at least: a
    # killed node can have acknowledged at most CRASH_LEAD more, so every kill falls on a
    # node restarted and acknowledging, and batches are left for the last one.
    third = CRASH_BATCHES // CRASH_KILLS
    kill_at = [i * third + rng.randrange(250, third - CRASH_LEAD - 250) for i in range(CRASH_KILLS)]
    acks: list[Ack] = []
    # At each kill: the highest seq acknowledged (every ack came from the live node, so that
    # batch and all before it must survive) and how many batches were still unacknowledged.
    acked_at_kill: list[int] = []
    unacked_at_kill: list[int] = []
    killed = asyncio.Event()
    acked = asyncio.Event()
    up = [True]  # the node's process is running (not killed yet)
    held: list[Publisher] = []

    def on_ack(fut: asyncio.Future[Ack]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        acks.append(fut.result())
        acked.set()
        i = len(acked_at_kill)
        if i < len(kill_at) and len(acks) >= kill_at[i] and up[0]:
            # Killed right here, in the kth ack's callback: not after whatever else the
            # publisher read meanwhile.
            assert node.proc is not None
            node.proc.send_signal(signal.SIGKILL)
            up[0] = False
            acked_at_kill.append(max(a.seq for a in acks))
            unacked_at_kill.append(held[0].unacked)
            killed.set()

    async def restarter() -> None:
        for _ in kill_at:
            await killed.wait()
            killed.clear()
            assert node.proc is not None
            await asyncio.to_thread(node.proc.wait)
            await restart(node)
            up[0] = True

    t0 = time.monotonic()
    async with Publisher(
        node.ws_url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY,
        retry_delay=0.02, retry_max=0.2,
    ) as pub:  # fmt: skip
        held.append(pub)
        restarting = asyncio.create_task(restarter())
        futures = []
        async with asyncio.timeout(80 * SECOND):
            for seq in range(CRASH_BATCHES):
                while seq - len(acks) >= CRASH_LEAD:
                    acked.clear()
                    await acked.wait()
                payload = generated_payload(CRASH_SEED, seq, CRASH_SIZE)
                await pub.room(len(payload))
                fut = pub.submit(seq, payload)
                fut.add_done_callback(on_ack)
                futures.append(fut)
            await asyncio.gather(*futures)
            await restarting
            # One session per process (the last may open after the last ack).
            await until(
                lambda: pub.nodes[0].sessions >= CRASH_KILLS + 1, HOP_TIMEOUT, "a reconnect"
            )
    seconds = time.monotonic() - t0

    assert sorted(a.seq for a in acks) == list(range(CRASH_BATCHES))
    # Each restart took up at least where the acknowledged batches ended.
    starts = restored_next(node)
    assert starts[0] == 0 and len(starts) == CRASH_KILLS + 1, starts
    for at_kill, restored in zip(acked_at_kill, starts[1:], strict=True):
        assert restored > at_kill, (acked_at_kill, starts)
    got = await read_range(node, SEQUENCER_HEX, 0, CRASH_BATCHES)
    for seq in range(CRASH_BATCHES):
        assert got[seq] == generated_payload(CRASH_SEED, seq, CRASH_SIZE), f"batch {seq}"
    assert await range_status(node, CRASH_BATCHES) == (200, [])  # nothing after the last
    counts = await pushes(node)  # this process's: since the last restart
    assert counts.get("conflict", 0) == counts.get("gap", 0) == 0, counts
    print(f"{CRASH_BATCHES} x 2 KB, kills after {kill_at} acks: {seconds:.1f} s;")
    print(f"  highest acked at each kill {acked_at_kill}, restored next {starts[1:]}")
    print(f"  unacknowledged at each kill {unacked_at_kill}")
    # The kills fell mid-stream: the publisher had batches to resend.
    assert sum(unacked_at_kill) > 0, unacked_at_kill


# --- 2. refusals ------------------------------------------------------------------------------
MAX_PAYLOAD = 4096  # the refusals node's [batches] max_payload_bytes
FLOOD = 200  # unauthenticated WebSocket upgrades, and as many POSTs
FLOOD_CONCURRENCY = 20  # at once: a flood, bounded on a shared two-core machine
OTHER_KEY = keccak(b"ingress system test: not a sequencer")
OTHER_HEX = "0x" + Signer(OTHER_KEY).address.hex()


def push_message(
    seq: int, payload: bytes, *, key: bytes = SEQUENCER_KEY, signed: bytes | None = None,
    stream: str = STREAM,
) -> bytes:  # fmt: skip
    """A push of ``payload`` signed by ``key`` over ``signed`` (default: the payload)."""
    sig = sign_batch(Signer(key), CHAIN_ID, stream, seq, payload if signed is None else signed)
    return encode_push(Push(PUSH, stream, seq, sig, payload))


def refusal_cases(first: int) -> list[tuple[str, bytes, int, int, dict[str, Any] | None]]:
    """(outcome counted, push message, code, HTTP status, data) after batches up to
    ``first - 1`` were accepted; ``first - 1`` is pushed again (a duplicate)."""
    unreadable = bytearray(push_message(first, payload_of(first)))
    unreadable[-len(payload_of(first)) - 1] = 9  # the signature's v: 0 or 1 only
    return [
        ("signer", push_message(first, payload_of(first), signed=b"another"), -32042, 403, None),
        ("signer", push_message(first, payload_of(first), key=OTHER_KEY), -32042, 403,
         {"signer": OTHER_HEX}),
        ("signature", bytes(unreadable), -32043, 403, None),
        ("too_large", push_message(first, payload_of(first, MAX_PAYLOAD + 1)), -32044, 413,
         {"limit": MAX_PAYLOAD}),
        ("malformed", b"\x01 not a push message", -32600, 400, None),
        ("conflict", push_message(first - 2, payload_of(first)), -32041, 409,
         {"seq": first - 2}),
        ("gap", push_message(first + 5, payload_of(first + 5)), -32040, 409,
         {"expected": first}),
        ("unknown_stream", push_message(first, payload_of(first), stream="other/batches"),
         -32045, 404, None),
        ("duplicate", push_message(first - 1, payload_of(first - 1)), 0, 200, None),
    ]  # fmt: skip


def check_answer(
    answer: dict[str, Any], message: bytes, code: int, data: dict[str, Any] | None
) -> None:
    """``answer`` is the one for ``message``: an ack (``code`` 0) or that error."""
    if code == -32600:  # a malformed message has no stream or seq to name
        stream, seq = "", 0
    else:
        push = decode_push(message)
        stream, seq = push.stream, push.seq
    assert answer["stream"] == stream and answer["seq"] == seq, answer
    if code == 0:
        assert answer["type"] == "ack", answer
        return
    assert answer["type"] == "error" and answer["code"] == code and answer["message"], answer
    if code == -32042 and data is None:  # forged: the key recovered is nobody's
        assert answer["data"]["signer"] not in (SEQUENCER_HEX, OTHER_HEX), answer
    for k, v in (data or {}).items():
        assert answer["data"][k] == v, answer


async def post(node: Relay, body: bytes, api_key: str | None = API_KEY) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/octet-stream"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    async with (
        aiohttp.ClientSession() as s,
        s.post(node.url + "/batches", data=body, headers=headers) as r,
    ):
        return r.status, await r.read()


async def upgrade_status(node: Relay, api_key: str | None) -> int:
    """The HTTP status of a WebSocket upgrade to ``/batches`` (101: it opened)."""
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    try:
        async with connect(
            node.ws_url + "/batches", additional_headers=headers, proxy=None,
            open_timeout=HOP_TIMEOUT,
        ):  # fmt: skip
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_refusals_are_answered_and_counted_and_the_node_keeps_acknowledging(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    lab = await start_ingress(
        anvil_factory, relay_factory, tmp_path, settings=f"max_payload_bytes = {MAX_PAYLOAD}"
    )
    (node,) = lab.ingresses
    expected: dict[str, float] = {}

    def count(outcome: str, n: int = 1) -> None:
        expected[outcome] = expected.get(outcome, 0) + n

    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with connect(
        node.ws_url + "/batches", additional_headers=auth, proxy=None, compression=None
    ) as ws:

        async def ws_push(message: bytes) -> dict[str, Any]:
            await ws.send(message)
            async with asyncio.timeout(HOP_TIMEOUT):
                answer = await ws.recv()
            assert isinstance(answer, str)
            return orjson.loads(answer)

        # Over WebSocket: batches 0 and 1, then each refusal on the same connection.
        for seq in (0, 1):
            ack = await ws_push(push_message(seq, payload_of(seq)))
            assert ack == {"type": "ack", "stream": STREAM, "seq": seq}
            count("accepted")
        for outcome, message, code, _status, data in refusal_cases(2):
            check_answer(await ws_push(message), message, code, data)
            count(outcome)
        # Over HTTP: batches 2 and 3, then the same refusals with their statuses.
        for seq in (2, 3):
            status, body = await post(node, push_message(seq, payload_of(seq)))
            assert status == 200 and orjson.loads(body) == {
                "type": "ack", "stream": STREAM, "seq": seq
            }  # fmt: skip
            count("accepted")
        for outcome, message, code, status, data in refusal_cases(4):
            got_status, body = await post(node, message)
            assert got_status == status, (outcome, got_status, body)
            check_answer(orjson.loads(body), message, code, data)
            count(outcome)

        # Unauthenticated: upgrades and POSTs without a key or with a wrong one, at once.
        gate = asyncio.Semaphore(FLOOD_CONCURRENCY)

        async def bounded(call: Awaitable[int]) -> int:
            async with gate:
                return await call

        async def post_status(key: str | None) -> int:
            return (await post(node, push_message(4, payload_of(4)), key))[0]

        keys = [None if i % 2 else f"wrong-{i}" for i in range(FLOOD)]
        calls = [upgrade_status(node, k) for k in keys] + [post_status(k) for k in keys]
        async with asyncio.timeout(HOP_TIMEOUT):
            statuses = await asyncio.gather(*(bounded(c) for c in calls))
        assert statuses == [401] * (2 * FLOOD)
        count("unauthorized", 2 * FLOOD)

        assert await pushes(node) == expected
        async with aiohttp.ClientSession() as s, s.get(node.url + "/health") as r:
            assert r.status == 200
        # Unaffected: the same connection, and a new POST, are acknowledged at once.
        assert await ws_push(push_message(4, payload_of(4))) == {
            "type": "ack", "stream": STREAM, "seq": 4
        }  # fmt: skip
        status, body = await post(node, push_message(5, payload_of(5)))
        assert status == 200 and orjson.loads(body)["seq"] == 5
        count("accepted", 2)
    assert await pushes(node) == expected
    got = await read_range(node, SEQUENCER_HEX, 0, 6)
    assert got == {seq: payload_of(seq) for seq in range(6)}
    assert await range_status(node, 6) == (200, [])


# --- 3. acknowledgement after k relays --------------------------------------------------------
RELAY_ACK_TIMEOUT = 1.0  # seconds: the ingress's [batches] relay_ack_timeout here


async def test_acks_wait_for_k_relays_and_more_than_exist_time_out_durable(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    lab = await start_ingress(
        anvil_factory, relay_factory, tmp_path, relays=2,
        settings=f"relay_ack_timeout = {RELAY_ACK_TIMEOUT}",
    )  # fmt: skip
    (ingress,), relays = lab.ingresses, lab.relays

    def publisher(k: int) -> Publisher:
        return Publisher(
            ingress.ws_url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID,
            api_key=API_KEY, relays=k,
        )  # fmt: skip

    async with publisher(2) as pub, asyncio.timeout(HOP_TIMEOUT):
        acks = await asyncio.gather(*(pub.submit(s, payload_of(s)) for s in range(50)))
        acks.append(await pub.push(50, payload_of(50)))
    assert [a.seq for a in acks] == list(range(51))
    assert {a.relays for a in acks} == {2}

    async with publisher(3) as pub:
        t0 = time.monotonic()
        with pytest.raises(PublishRefused) as refused:
            await asyncio.wait_for(pub.push(51, payload_of(51)), HOP_TIMEOUT)
        waited = time.monotonic() - t0
    assert refused.value.code == -32046 and refused.value.data == {"durable": True}
    assert waited >= 0.9 * RELAY_ACK_TIMEOUT

    # One relay gone: two no longer hold the next batch; back, they do again.
    await kill(relays[1])
    await until(lambda: _equals(children(ingress), 1), HOP_TIMEOUT, "relay1 gone")
    async with publisher(2) as pub:
        with pytest.raises(PublishRefused) as refused:
            await asyncio.wait_for(pub.push(52, payload_of(52)), HOP_TIMEOUT)
    assert refused.value.code == -32046
    await restart(relays[1])
    await until(lambda: _equals(children(ingress), 2), HOP_TIMEOUT, "relay1 back")
    async with publisher(2) as pub:
        ack = await asyncio.wait_for(pub.push(53, payload_of(53)), HOP_TIMEOUT)
    assert ack.relays == 2

    counts = await pushes(ingress)
    assert counts == {"accepted": 54, "not_held": 2}, counts
    got = await read_range(ingress, SEQUENCER_HEX, 0, 54)
    assert got == {seq: payload_of(seq) for seq in range(54)}
    # "Held by 2" meant it: with the ingress gone, each relay still serves the batches
    # acknowledged as held from its own backlog.
    await kill(ingress)
    for relay, end in ((relays[0], 54), (relays[1], 54)):
        got = await read_range(relay, SEQUENCER_HEX, 0, end)
        assert got == {seq: payload_of(seq) for seq in range(end)}


async def _equals(value: Awaitable[float], want: float) -> bool:
    return await value == want


# --- 4. two ingress nodes ---------------------------------------------------------------------
TWO_BATCHES = 3000


async def test_two_ingress_nodes_feed_a_relay_every_batch_once_one_killed_mid_stream(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    lab = await start_ingress(
        anvil_factory, relay_factory, tmp_path, names=("ingress-a", "ingress-b"), relays=1
    )
    (a, b), (relay,) = lab.ingresses, lab.relays
    sub = BatchSubscription(
        f"{relay.ws_url}/feed", STREAM, from_seq=0, trust=[SEQUENCER_HEX], chain_id=CHAIN_ID
    )
    batches = aiter(sub)
    got: list[FeedBatch] = []
    acked = 0
    try:
        async with Publisher(
            [a.ws_url, b.ws_url], key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID,
            api_key=API_KEY, retry_delay=0.05, retry_max=0.5,
        ) as pub:  # fmt: skip
            async with asyncio.timeout(HOP_TIMEOUT):
                for seq in range(TWO_BATCHES):
                    if seq == TWO_BATCHES // 3:
                        got += await read_batches(batches, 500)
                        await kill(a)  # the relay's first parent, mid-stream
                    await pub.room(1000)
                    fut = pub.submit(seq, payload_of(seq))
                    if seq == TWO_BATCHES - 1:
                        await fut
                acked = TWO_BATCHES
            got += await read_batches(batches, TWO_BATCHES - 500)
    finally:
        await sub.aclose()
    assert acked == TWO_BATCHES
    assert len(got) == TWO_BATCHES
    check_batches(got, 0, SEQUENCER_HEX)
    assert sub.duplicates == 0 and not sub.dropped, (sub.duplicates, sub.dropped)
    # Whether both parents streamed at once before the kill (the relay then dropped second
    # copies) depends on the machine's timing; either way the subscriber got each batch
    # once (above). Dropping second copies is tested in tests/pair (two parents, one hub).
    # The survivor took every batch into its own durable log.
    got_b = await read_range(b, SEQUENCER_HEX, 0, TWO_BATCHES)
    assert got_b == {s: payload_of(s) for s in range(TWO_BATCHES)}


# --- 5. confirmed -----------------------------------------------------------------------------
CONFIRM_BATCHES = 1000
CONFIRMED = 600


async def test_confirmed_trims_the_relays_backlog_and_older_batches_come_from_the_log(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    lab = await start_ingress(anvil_factory, relay_factory, tmp_path, relays=1)
    (ingress,), (relay,) = lab.ingresses, lab.relays
    # relays=1: each ack means the relay holds the batch too.
    async with Publisher(
        ingress.ws_url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY,
        relays=1,
    ) as pub, asyncio.timeout(HOP_TIMEOUT):  # fmt: skip
        acks = []
        for seq in range(CONFIRM_BATCHES):
            await pub.room(1000)
            acks.append(pub.submit(seq, payload_of(seq)))
        assert {a.relays for a in await asyncio.gather(*acks)} == {1}
        await pub.confirm(CONFIRMED)
    # With the ingress gone, the relay serves what its backlog holds: from CONFIRMED on.
    await kill(ingress)

    async def trimmed() -> bool:
        return (await range_status(relay, CONFIRMED - 1))[0] == 404

    await until(trimmed, HOP_TIMEOUT, f"the relay to drop batch {CONFIRMED - 1}")
    for start in (0, CONFIRMED // 2):
        assert (await range_status(relay, start))[0] == 404
    kept = await read_range(relay, SEQUENCER_HEX, CONFIRMED, CONFIRM_BATCHES)
    assert kept == {s: payload_of(s) for s in range(CONFIRMED, CONFIRM_BATCHES)}

    # The ingress back: older batches climb to its durable log through the relay.
    await restart(ingress)

    async def served() -> bool:
        return (await range_status(relay, 0))[0] == 200

    await until(served, HOP_TIMEOUT, "the relay to serve batch 0 again")
    got = await read_range(relay, SEQUENCER_HEX, 0, CONFIRM_BATCHES)
    assert got == {s: payload_of(s) for s in range(CONFIRM_BATCHES)}

    sub = BatchSubscription(
        f"{relay.ws_url}/feed", STREAM, from_seq=0, trust=[SEQUENCER_HEX], chain_id=CHAIN_ID
    )
    try:
        taken = await read_batches(aiter(sub), CONFIRM_BATCHES)
    finally:
        await sub.aclose()
    assert len(taken) == CONFIRM_BATCHES
    check_batches(taken, 0, SEQUENCER_HEX)
    assert [b.seq for b in taken if b.fetched] == list(range(CONFIRMED))
