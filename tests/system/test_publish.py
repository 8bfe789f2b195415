"""The publisher against real ingress nodes: anvil (Arbitrum's chain id) behind relay
processes with a ``[batches]`` section, pushed to by the library and by ``chainrelay
publish`` in its own process; what the nodes hold is read back through ``GET
/feed/range`` and checked end to end (the sequencer's signature, seqs, payloads)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from eth_account import Account

from chainrelay.batches.frame import decode_range, open_frame
from chainrelay.clients.publisher import Publisher, generated_payload
from chainrelay.errors import PublishRefused
from chainrelay.tree.frame import decode
from tests.lab.procs import ROOT, AnvilFactory, Procs, Relay, RelayFactory, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

STREAM = "arbitrum/batches"
CHAIN_ID = 42161
API_KEY = "publisher-test-api-key"
MAX_FRAME = 2 * 1024 * 1024


def ingress_toml(log: Path, sequencer: str) -> str:
    return f"""
[batches]
log = "{log}"
api_keys = ["{API_KEY}"]

[[batches.streams]]
name = "{STREAM}"
chain_id = {CHAIN_ID}
sequencers = ["{sequencer}"]
"""


async def start_ingress(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path, count: int = 1
) -> tuple[bytes, str, list[Relay]]:
    """Anvil and ``count`` ingress nodes in front of it, each with its own durable log; the
    sequencer's key and address."""
    account = Account.create()
    anvil = await anvil_factory(chain_id=CHAIN_ID, block_time=1)
    nodes = [
        await relay_factory(
            [anvil.ws_url],
            ingress_toml(tmp_path / f"ingress{i}.sqlite", account.address),
            name=f"ingress{i}",
        )
        for i in range(count)
    ]
    return bytes(account.key), account.address, nodes


async def read_stream(node: Relay, sequencer: str, end: int) -> dict[int, bytes]:
    """Every batch ``0 .. end-1`` the node's range endpoint gives, checked: consecutive seqs,
    each frame signed by ``sequencer`` for this chain and stream."""
    got: dict[int, bytes] = {}
    async with aiohttp.ClientSession() as s:
        while len(got) < end:
            params = {"stream": STREAM, "from": str(len(got)), "limit": "1000"}
            async with s.get(node.url + "/feed/range", params=params) as r:
                assert r.status == 200, (r.status, await r.text())
                body = await r.read()
            frames = decode_range(body, MAX_FRAME)
            assert frames, f"nothing at {len(got)}"
            for raw in frames:
                frame = decode(raw, MAX_FRAME)
                assert frame.position == len(got)
                assert frame.stream == STREAM
                address, payload = open_frame(frame, MAX_FRAME)
                assert "0x" + address.hex() == sequencer.lower()
                got[frame.position] = payload
    return got


async def pushes(node: Relay, outcome: str) -> float:
    samples = await node.metrics()
    return sum(
        v
        for k, v in samples.items()
        if k.startswith("chainrelay_batch_pushes_total") and f'outcome="{outcome}"' in k
    )


def publish_cli(procs: Procs, *args: str, api_key: str = API_KEY) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CHAINRELAY_API_KEY": api_key}
    return procs.spawn(
        [sys.executable, "-m", "chainrelay", "--log-level", "WARNING", "publish", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )


async def finish(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str, str]:
    out, err = await asyncio.to_thread(proc.communicate, timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_library_pushes_1000_batches_all_acked_and_intact(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    key, address, [node] = await start_ingress(anvil_factory, relay_factory, tmp_path)
    payloads = [os.urandom(200 + 37 * (seq % 50)) for seq in range(1000)]
    async with Publisher(
        node.ws_url, key=key, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY
    ) as pub:
        futures = [pub.submit(seq, p) for seq, p in enumerate(payloads)]
        acks = await asyncio.wait_for(asyncio.gather(*futures), 60 * SECOND)
        assert [a.seq for a in acks] == list(range(1000))
        assert {a.url for a in acks} == {node.ws_url + "/batches"}
        # One at a time, then what the node refuses: a conflicting payload for an accepted
        # seq, and a gap (the node names the next seq it expects).
        last = await asyncio.wait_for(pub.push(1000, b"\x01" * 2048), 10 * SECOND)
        assert last.seq == 1000 and last.ms > 0
        payloads.append(b"\x01" * 2048)
        with pytest.raises(PublishRefused) as conflict:
            await asyncio.wait_for(pub.push(5, b"another payload"), 10 * SECOND)
        assert conflict.value.code == -32041
        with pytest.raises(PublishRefused) as gap:
            await asyncio.wait_for(pub.push(2000, b"too far"), 10 * SECOND)
        assert gap.value.code == -32040
        assert isinstance(gap.value.data, dict) and gap.value.data["expected"] == 1001
        assert pub.nodes[0].sessions == 1
    got = await read_stream(node, address, 1001)
    assert [got[seq] for seq in range(1001)] == payloads
    assert await pushes(node, "accepted") == 1001


async def test_cli_publishes_a_generated_stream_and_a_rerun_is_all_duplicates(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, procs: Procs, tmp_path: Path
) -> None:
    key, address, [node] = await start_ingress(anvil_factory, relay_factory, tmp_path)
    key_file = tmp_path / "sequencer.key"
    key_file.write_text("0x" + key.hex() + "\n")
    args = [
        node.ws_url, "--stream", STREAM, "--chain-id", str(CHAIN_ID), "--key-file",
        str(key_file), "--count", "500", "--size", "2048", "--seed", "7", "--confirm-every",
        "100",
    ]  # fmt: skip
    code, out, err = await finish(publish_cli(procs, *args), 60 * SECOND)
    assert code == 0, err
    summary = orjson.loads(out.strip().splitlines()[-1])
    assert summary["batches"] == 500
    assert summary["bytes"] == 500 * 2048
    assert summary["seconds"] > 0
    assert summary["batches_per_s"] == pytest.approx(500 / summary["seconds"], rel=0.01)
    ms = summary["ack_ms"]
    assert 0 < ms["p50"] <= ms["p90"] <= ms["p99"] <= ms["max"]
    got = await read_stream(node, address, 500)
    assert all(got[seq] == generated_payload(7, seq, 2048) for seq in range(500))
    assert await pushes(node, "accepted") == 500

    code, out, err = await finish(publish_cli(procs, *args), 60 * SECOND)
    assert code == 0, err
    assert orjson.loads(out.strip().splitlines()[-1])["batches"] == 500
    assert await pushes(node, "duplicate") == 500
    assert await pushes(node, "accepted") == 500


async def test_cli_with_a_wrong_api_key_exits_2_at_once_and_writes_nothing(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, procs: Procs, tmp_path: Path
) -> None:
    key, _address, [node] = await start_ingress(anvil_factory, relay_factory, tmp_path)
    args = [
        node.ws_url, "--stream", STREAM, "--chain-id", str(CHAIN_ID), "--key", key.hex(),
        "--count", "10", "--size", "100",
    ]  # fmt: skip
    # Well within the publisher's give-up time: a refused key is not retried.
    code, out, err = await finish(publish_cli(procs, *args, api_key="wrong"), 15 * SECOND)
    assert code == 2, (out, err)
    assert "API key" in err and "401" in err
    assert orjson.loads(out.strip().splitlines()[-1])["batches"] == 0
    assert await pushes(node, "unauthorized") >= 1
    assert await pushes(node, "accepted") == 0
    async with aiohttp.ClientSession() as s:
        params = {"stream": STREAM, "from": "0"}
        async with s.get(node.url + "/feed/range", params=params) as r:
            assert r.status == 404 or (r.status == 200 and await r.read() == b"")


async def test_two_ingress_nodes_both_get_every_batch_one_restarted_midway(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    key, address, (a, b) = await start_ingress(anvil_factory, relay_factory, tmp_path, 2)
    payloads = [generated_payload(1, seq, 1000) for seq in range(600)]
    async with Publisher(
        [a.ws_url, b.ws_url], key=key, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY,
        retry_delay=0.05, retry_max=0.5,
    ) as pub:  # fmt: skip
        await asyncio.wait_for(
            asyncio.gather(*(pub.submit(s, payloads[s]) for s in range(200))), 30 * SECOND
        )
        await until(lambda: not pub.nodes[1].queue, 10 * SECOND, "b to acknowledge 200")
        # b dies; a alone acknowledges the next batches, b's connection keeps them.
        assert b.proc is not None
        b.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(b.proc.wait)
        acks = await asyncio.wait_for(
            asyncio.gather(*(pub.submit(s, payloads[s]) for s in range(200, 600))),
            30 * SECOND,
        )
        assert {ack.url for ack in acks} == {a.ws_url + "/batches"}
        assert len(pub.nodes[1].queue) == 400
        b.start()  # the same port and durable log
        await b.wait_ready()
        await until(lambda: not pub.nodes[1].queue, 30 * SECOND, "b to catch up")
        assert pub.nodes[1].sessions >= 2 and pub.nodes[1].dropped == 0
    for node in (a, b):
        got = await read_stream(node, address, 600)
        assert [got[seq] for seq in range(600)] == payloads


async def test_a_node_down_past_max_unacked_bytes_comes_back_behind_and_fails_nothing(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    key, address, (a, b) = await start_ingress(anvil_factory, relay_factory, tmp_path, 2)
    payloads = [generated_payload(2, seq, 1000) for seq in range(300)]
    async with Publisher(
        [a.ws_url, b.ws_url], key=key, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY,
        retry_delay=0.05, retry_max=0.5, max_unacked_bytes=20_000,  # ~19 batches
    ) as pub:  # fmt: skip
        node_b = pub.nodes[1]
        for seq in range(50):
            await asyncio.wait_for(pub.push(seq, payloads[seq]), 10 * SECOND)
        await until(lambda: not node_b.queue, 10 * SECOND, "b to acknowledge 50")
        assert b.proc is not None
        b.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(b.proc.wait)
        # a alone acknowledges 200 more; b's connection keeps only the newest of them.
        for seq in range(50, 250):
            ack = await asyncio.wait_for(pub.push(seq, payloads[seq]), 10 * SECOND)
            assert ack.url == a.ws_url + "/batches"
        assert node_b.dropped > 0 and min(node_b.queue) > 50
        b.start()  # the same port and durable log: it expects 50, which only a holds now
        await b.wait_ready()
        # Marked behind, then its connection closes (the close takes a loop turn or two).
        await until(lambda: node_b.behind and not node_b.connected, 30 * SECOND, "b behind, closed")
        assert pub.behind == [node_b.url] and not node_b.queue
        sessions = node_b.sessions
        for seq in range(250, 300):
            ack = await asyncio.wait_for(pub.push(seq, payloads[seq]), 10 * SECOND)
            assert ack.url == a.ws_url + "/batches"
        assert pub.unacked == 0 and not node_b.queue and node_b.sessions == sessions
        assert await pushes(b, "accepted") == 0  # restarted: its counters began again
    got = await read_stream(a, address, 300)
    assert [got[seq] for seq in range(300)] == payloads
    got = await read_stream(b, address, 50)
    assert [got[seq] for seq in range(50)] == payloads[:50]
