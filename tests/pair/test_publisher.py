"""The publisher's pieces that need no ingress node: URLs, keys, generated and file
batches, ``chainrelay publish`` arguments, and what a publisher does before it connects."""

from __future__ import annotations

import asyncio
import io
import lzma
from pathlib import Path
from typing import Required, TypedDict

import orjson
import pytest
from eth_account import Account

from chainrelay.batches.frame import PUSH, PUSH_HEADER_LEN, batch_digest, decode_push
from chainrelay.cli import main
from chainrelay.clients.publisher import (
    Publisher,
    generated_payload,
    ingress_url,
    percentile,
    private_key,
    publish_plan,
    read_batches,
)
from chainrelay.errors import ConfigError, PublishError, PublishRefused
from chainrelay.tree.frame import keccak, recover

KEY = bytes(Account.create().key)


class PlanKeys(TypedDict, total=False):
    """publish_plan's stream and keys: what every test gives it."""

    stream: Required[str]
    chain_id: Required[int]
    key: str | None
    key_file: str | None
    api_key: str | None


class PlanArgs(PlanKeys, total=False):
    """All of publish_plan's keyword arguments, for the tests that change any of them."""

    file: str | None
    count: int | None
    size: int | None
    seed: int
    from_seq: int
    rate: float | None
    relays: int
    window: int
    confirm_every: int
    env: dict[str, str] | None


OPTS: PlanKeys = {"stream": "arbitrum/batches", "chain_id": 42161, "key": KEY.hex(), "api_key": "k"}


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("ws://127.0.0.1:8545", "ws://127.0.0.1:8545/batches"),
        ("ws://127.0.0.1:8545/", "ws://127.0.0.1:8545/batches"),
        ("ws://127.0.0.1:8545/batches", "ws://127.0.0.1:8545/batches"),
        ("http://h:1", "ws://h:1/batches"),
        ("https://h", "wss://h/batches"),
        ("wss://h:443/prefix/batches", "wss://h:443/prefix/batches"),
    ],
)
def test_ingress_url(given: str, url: str) -> None:
    assert ingress_url(given) == url


@pytest.mark.parametrize("bad", ["127.0.0.1:8545", "ftp://h:1", "ws://", "batches"])
def test_ingress_url_refuses_what_is_not_one(bad: str) -> None:
    with pytest.raises(ConfigError):
        ingress_url(bad)


def test_private_key_hex_or_bytes() -> None:
    assert private_key(KEY) == KEY
    assert private_key(KEY.hex()) == KEY
    assert private_key("0x" + KEY.hex() + "\n") == KEY
    for bad in ("0x1234", "zz" * 32, KEY[:31]):
        with pytest.raises(ConfigError):
            private_key(bad)


def test_generated_payload_is_deterministic_and_incompressible() -> None:
    a = generated_payload(7, 100, 2048)
    assert a == generated_payload(7, 100, 2048)
    assert len(a) == 2048
    assert a != generated_payload(7, 101, 2048)
    assert a != generated_payload(8, 100, 2048)
    assert generated_payload(7, 100, 100) == a[:100]  # a prefix: same stream, smaller sizes
    assert len(lzma.compress(generated_payload(1, 1, 100_000))) > 100_000


def test_read_batches_hex_lines() -> None:
    text = io.StringIO("0x0102\n\nAABB\n  0Xff  \n")
    assert read_batches(text) == [b"\x01\x02", b"\xaa\xbb", b"\xff"]


@pytest.mark.parametrize("line", ["0x12g4", "abc", "0x"])
def test_read_batches_names_the_bad_line(line: str) -> None:
    with pytest.raises(ConfigError, match="line 2"):
        read_batches(["0x01", line])


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([3.0], 0.9) == 3.0
    assert percentile([], 0.5) == 0.0


def test_plan_generated_and_from_file(tmp_path: Path) -> None:
    plan = publish_plan(["ws://h:1"], count=3, size=10, seed=5, from_seq=20, **OPTS)
    assert plan.urls == ["ws://h:1/batches"]
    assert [plan.payload(i) for i in range(3)] == [
        generated_payload(5, s, 10) for s in (20, 21, 22)
    ]
    batches = tmp_path / "b.txt"
    batches.write_text("0x01\n02\n")
    key_file = tmp_path / "key"
    key_file.write_text("0x" + KEY.hex() + "\n")
    opts: PlanKeys = {**OPTS, "key": None, "key_file": str(key_file)}
    plan = publish_plan(["ws://h:1"], file=str(batches), **opts)
    assert (plan.count, plan.key) == (2, KEY)
    assert [plan.payload(i) for i in range(2)] == [b"\x01", b"\x02"]


def test_plan_api_key_from_the_environment() -> None:
    opts: PlanKeys = {**OPTS, "api_key": None}
    plan = publish_plan(["ws://h:1"], count=1, size=1, env={"CHAINRELAY_API_KEY": "e"}, **opts)
    assert plan.api_key == "e"
    with pytest.raises(ConfigError, match="API key"):
        publish_plan(["ws://h:1"], count=1, size=1, env={}, **opts)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"count": None}, "--count N and --size"),
        ({"size": 0}, "positive"),
        ({"file": "/nonexistent/batches"}, "exclude"),
        ({"key": None}, "exactly one of --key"),
        ({"key_file": "/k"}, "exactly one of --key"),
        ({"stream": "x" * 33}, "--stream"),
        ({"rate": 0.0}, "--rate"),
        ({"relays": 256}, "--relays"),
        ({"window": 0}, "--window"),
        ({"from_seq": -1}, "--from"),
        ({"confirm_every": -1}, "--confirm-every"),
    ],
)
def test_plan_refuses_bad_arguments(change: PlanArgs, match: str) -> None:
    kw: PlanArgs = {**OPTS, "count": 10, "size": 10, "env": {}, **change}
    with pytest.raises(ConfigError, match=match):
        publish_plan(["ws://h:1"], **kw)


def test_cli_bad_arguments_exit_2_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 is discard: a plan that got as far as connecting would fail differently.
    argv = ["publish", "ws://127.0.0.1:9", "--stream", "arbitrum/batches", "--chain-id", "1"]
    assert main([*argv, "--api-key", "k", "--count", "1", "--size", "1"]) == 2
    assert "--key" in capsys.readouterr().err
    assert main([*argv, "--key", KEY.hex(), "--api-key", "k", "--file", "/nonexistent"]) == 2
    assert "/nonexistent" in capsys.readouterr().err


async def test_submit_signs_the_batch_for_the_stream() -> None:
    pub = Publisher("ws://127.0.0.1:9", key=KEY, stream="s/batches", chain_id=5, api_key="k")
    future = pub.submit(3, b"payload")
    queued = pub.nodes[0].queue[3]
    push = decode_push(queued.message)
    assert (push.kind, push.stream, push.seq, push.payload) == (PUSH, "s/batches", 3, b"payload")
    digest = batch_digest(5, "s/batches", 3, keccak(b"payload"))
    assert recover(push.signature, digest) == pub.signer.address
    with pytest.raises(PublishError, match="already waiting"):
        pub.submit(3, b"payload")
    await pub.close()  # never started: what waits fails, nothing hangs
    with pytest.raises(PublishError, match="closed"):
        await future


async def test_submit_bounds_the_bytes_waiting() -> None:
    pub = Publisher(
        ["ws://127.0.0.1:9", "ws://127.0.0.1:10"],
        key=KEY,
        stream="s",
        chain_id=1,
        api_key="k",
        max_unacked_bytes=1000,
    )
    futures = [pub.submit(0, bytes(600))]  # one batch always fits, whatever its size
    with pytest.raises(PublishError, match="max_unacked_bytes"):
        pub.submit(1, bytes(600))
    waiting = asyncio.ensure_future(pub.room(600))
    await asyncio.sleep(0)
    assert not waiting.done()
    pub.resolve(pub.nodes[0].queue[0], "ws://x", None)  # as an ack does
    await asyncio.wait_for(waiting, 5)
    futures.append(pub.submit(1, bytes(600)))
    assert (await futures[0]).seq == 0
    # The second node keeps the batch the first acknowledged, within its own byte bound.
    assert list(pub.nodes[1].queue) == [1]
    assert pub.nodes[1].dropped == 1
    await pub.close()
    with pytest.raises(PublishError):
        await futures[1]


async def test_give_up_after_with_no_node_reachable() -> None:
    # Port 9 on loopback refuses: every connect fails at once, the back-off keeps trying.
    async with Publisher(
        "ws://127.0.0.1:9",
        key=KEY,
        stream="s",
        chain_id=1,
        api_key="k",
        give_up_after=0.3,
        retry_delay=0.05,
    ) as pub:
        with pytest.raises(PublishError, match="no ingress node reachable") as caught:
            await asyncio.wait_for(pub.push(0, b"x"), 10)
        assert "127.0.0.1:9" in str(caught.value)
        assert pub.nodes[0].failures >= 1


# --- refusals: whose fault, and who may still acknowledge -------------------------------------
# Driven through ``_answer``, the text each node's connection receives; nothing connects.
def two_nodes(**limits: int) -> Publisher:
    return Publisher(
        ["ws://127.0.0.1:9", "ws://127.0.0.1:10"],
        key=KEY,
        stream="s",
        chain_id=1,
        api_key="k",
        resync_limit=0,  # past the resend limit at the first refusal: no connection to close
        **limits,
    )


def answer(pub: Publisher, node: int, kind: str, seq: int, **fields: object) -> None:
    # As the node's text message: the publisher ignores binary ones.
    pub.nodes[node]._answer(
        orjson.dumps({"type": kind, "stream": "s", "seq": seq, **fields}).decode()
    )


def refuse(pub: Publisher, node: int, seq: int, code: int, **data: object) -> None:
    answer(pub, node, "error", seq, code=code, message="refused", data=data)


@pytest.mark.parametrize("code", [-32040, -32046, -32047])
async def test_one_nodes_refusal_leaves_the_batch_to_the_other(code: int) -> None:
    pub = two_nodes()
    future = pub.submit(0, b"x")
    refuse(pub, 1, 0, code, expected=7)  # b refuses first: acks wait for an fsync
    assert not future.done() and 0 not in pub.nodes[1].queue and 0 in pub.nodes[0].queue
    answer(pub, 0, "ack", 0)
    assert (await future).url == pub.nodes[0].url
    assert pub.unacked == 0 and not pub.behind
    await pub.close()


@pytest.mark.parametrize("code", [-32040, -32046, -32047])
async def test_a_batch_every_node_refused_for_its_state_fails(code: int) -> None:
    pub = two_nodes()
    future = pub.submit(0, b"x")
    refuse(pub, 0, 0, code)
    assert not future.done()
    refuse(pub, 1, 0, code)
    with pytest.raises(PublishRefused) as caught:
        await future
    assert caught.value.code == code and caught.value.url == pub.nodes[1].url
    assert pub.unacked == 0 and not pub.behind  # nobody has it: it may be pushed again
    await pub.close()


@pytest.mark.parametrize("code", [-32041, -32042, -32043, -32044, -32045, -32600])
async def test_the_sequencers_fault_fails_the_batch_at_once_on_every_node(code: int) -> None:
    pub = two_nodes()
    future = pub.submit(0, b"x")
    refuse(pub, 1, 0, code)
    with pytest.raises(PublishRefused) as caught:
        await future
    assert caught.value.code == code
    assert not pub.nodes[0].queue and not pub.nodes[1].queue
    await pub.close()


async def test_a_node_expecting_what_only_the_other_acknowledged_is_behind() -> None:
    # b's connection keeps ~3 batches the other acknowledged: b was down longer than that.
    pub = two_nodes(max_unacked_bytes=3 * (PUSH_HEADER_LEN + 100 + 2))
    acked = []
    for seq in range(10):
        future = pub.submit(seq, bytes(100))
        answer(pub, 0, "ack", seq)
        acked.append(await future)
    b = pub.nodes[1]
    assert b.dropped > 0 and min(b.queue) > 1 and b.lost_through == min(b.queue) - 1
    waiting = pub.submit(10, bytes(100))
    # b comes back holding 0..1 and answers every resent batch with a gap at 2.
    for seq in sorted(b.queue):
        refuse(pub, 1, seq, -32040, expected=2)
    assert pub.behind == [b.url] and b.dropped == 11 and not b.queue
    assert not waiting.done()  # a still holds it
    answer(pub, 0, "ack", 10)
    assert (await waiting).url == pub.nodes[0].url
    later = pub.submit(11, bytes(100))
    assert 11 not in b.queue and b.dropped == 12  # not sent to any more
    answer(pub, 0, "ack", 11)
    assert (await later).seq == 11 and [a.seq for a in acked] == list(range(10))
    await pub.close()


async def test_a_gap_at_a_batch_never_pushed_fails_it_and_marks_nothing_behind() -> None:
    pub = Publisher("ws://127.0.0.1:9", key=KEY, stream="s", chain_id=1, api_key="k")
    future = pub.submit(2000, b"x")
    refuse(pub, 0, 2000, -32040, expected=1001)
    with pytest.raises(PublishRefused) as caught:
        await future
    assert caught.value.code == -32040 and caught.value.data == {"expected": 1001}
    assert not pub.behind
    again = pub.submit(1001, b"y")  # the node is still pushed to
    assert 1001 in pub.nodes[0].queue
    answer(pub, 0, "ack", 1001)
    assert (await again).seq == 1001
    await pub.close()


async def test_a_lone_nodes_refusal_past_the_resend_limit_fails_the_batch_not_the_node() -> None:
    pub = Publisher(
        "ws://127.0.0.1:9", key=KEY, stream="s", chain_id=1, api_key="k", resync_limit=0
    )
    first = pub.submit(0, b"x")
    refuse(pub, 0, 0, -32047)  # past the resend limit: nobody else holds it
    with pytest.raises(PublishRefused):
        await first
    # Not lost to another node: pushing it again is the sequencer's to decide, not "behind".
    assert pub.nodes[0].lost_through == -1 and not pub.behind
    await pub.close()
