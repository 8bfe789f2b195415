"""Authenticated child relays and anonymous feed clients, with real processes: anvil as
Arbitrum's chain (42161), an ingress node whose ``[tree] child_keys`` lists one relay's
address and that allows one anonymous session per address, a relay holding that key
(``[tree] node_key``), and raw WebSocket clients on the ingress's ``/feed``.

The relay links and takes every batch, and an acknowledgement that waits for relays
counts it. A raw client that names itself a relay and says it holds every batch proves no
key: it is served, but an acknowledgement that waits for two relays still times out. A
second anonymous client from the same address, and the first one back too soon, are closed
4429 with when to retry; the keyed relay beside them is none of that.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chainrelay.clients.publisher import Publisher
from chainrelay.errors import PublishRefused
from chainrelay.tree import frame as feedframe
from chainrelay.tree.frame import Signer, keccak
from chainrelay.tree.session import CLOSE_TOO_MANY, Want, encode_held, encode_hello
from tests.lab.batches import (
    API_KEY,
    CHAIN_ID,
    SEQUENCER_HEX,
    SEQUENCER_KEY,
    STREAM,
    batches_toml,
    children,
    payload_of,
    read_range,
)
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND
from tests.system.test_ingress import AnvilFactory, RelayFactory

pytestmark = pytest.mark.lab

# The child relay's node key (test-only), and the address the ingress lists for it.
RELAY_KEY = keccak(b"lab child relay key")
RELAY_ADDRESS = "0x" + Signer(RELAY_KEY).address.hex()
# Longer than the test: a client refused for coming back too soon is refused for the rest.
COOLDOWN = 600.0
RELAY_ACK_TIMEOUT = 1.0  # seconds: the ingress's [batches] relay_ack_timeout here
# Node processes on a loaded two-core machine: seconds, not milliseconds.
HOP_TIMEOUT = 30 * SECOND
# A name of the shape a relay's hello gives (its Via name).
FAKE_NODE = "chainrelay-0badf00d"


def ingress_toml(tmp_path: Path) -> str:
    tree = (
        f'[tree]\nchild_keys = ["{RELAY_ADDRESS}"]\n'
        f"anon_per_address = 1\nanon_reconnect_cooldown = {COOLDOWN}\n\n"
    )
    return tree + batches_toml(
        SEQUENCER_HEX,
        log=tmp_path / "ingress.sqlite",
        api_keys=[API_KEY],
        settings=f"relay_ack_timeout = {RELAY_ACK_TIMEOUT}",
    )


def keyed_relay_toml(ingress: Relay) -> str:
    text = batches_toml(SEQUENCER_HEX, parents=[ingress])
    return text.replace("[tree]\n", f'[tree]\nnode_key = "0x{RELAY_KEY.hex()}"\n', 1)


def publisher(ingress: Relay, relays: int) -> Publisher:
    return Publisher(
        ingress.ws_url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY,
        relays=relays,
    )  # fmt: skip


async def anonymous(ingress: Relay) -> tuple[ClientConnection, dict[str, object]]:
    """A raw ``/feed`` client that names itself a relay (no proof): its session and the
    parent's first answer (a welcome, or an error)."""
    conn = await connect(f"{ingress.ws_url}/feed", max_size=None, compression=None)
    await conn.send(encode_hello([Want(STREAM, from_position=0)], node=FAKE_NODE), text=True)
    async with asyncio.timeout(HOP_TIMEOUT):
        first = await conn.recv()
    assert isinstance(first, str)
    return conn, orjson.loads(first)


async def refused(ingress: Relay) -> tuple[int | None, dict[str, object]]:
    """An anonymous client the ingress refuses: the close code and the error it was told."""
    conn, answer = await anonymous(ingress)
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(HOP_TIMEOUT):
            await conn.recv()
    rcvd = closed.value.rcvd
    return (rcvd.code if rcvd is not None else None), answer


async def until_position(conn: ClientConnection, position: int) -> None:
    """Read the feed until the frame at ``position`` came."""
    async with asyncio.timeout(HOP_TIMEOUT):
        while True:
            message = await conn.recv()
            if isinstance(message, bytes):
                if feedframe.decode(message, len(message)).position >= position:
                    return


async def _count(node: Relay, want: float) -> bool:
    return await children(node) == want


async def test_a_keyed_relay_counts_for_acks_and_anonymous_clients_neither_count_nor_crowd(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    anvil = await anvil_factory(chain_id=CHAIN_ID, block_time=1.0)
    ingress = await relay_factory([anvil.ws_url], ingress_toml(tmp_path), name="ingress")
    relay = await relay_factory([anvil.ws_url], keyed_relay_toml(ingress), name="relay")
    await until(lambda: _count(ingress, 1), HOP_TIMEOUT, "the keyed relay linked")

    def proved() -> bool:
        return f"is relay {RELAY_ADDRESS}" in ingress.log_path.read_text(errors="replace")

    await until(proved, HOP_TIMEOUT, "the ingress to log the relay's key")

    # Acknowledged once the keyed relay holds each batch.
    async with publisher(ingress, 1) as pub, asyncio.timeout(HOP_TIMEOUT):
        acks = [await pub.push(seq, payload_of(seq)) for seq in range(5)]
    assert [a.relays for a in acks] == [1] * 5

    # A client that says it is a relay and holds everything: served, never counted.
    fake, welcome = await anonymous(ingress)
    assert welcome["type"] == "welcome"
    await until(lambda: _count(ingress, 2), HOP_TIMEOUT, "the anonymous client served")
    async with publisher(ingress, 2) as pub:
        push = asyncio.ensure_future(pub.push(5, payload_of(5)))
        await until_position(fake, 5)
        await fake.send(encode_held(STREAM, 5), text=True)
        with pytest.raises(PublishRefused) as not_held:
            await asyncio.wait_for(push, HOP_TIMEOUT)
    assert not_held.value.code == -32046 and not_held.value.data == {"durable": True}
    # The keyed relay holds all six all the same.
    got = await read_range(relay, SEQUENCER_HEX, 0, 6)
    assert got == {seq: payload_of(seq) for seq in range(6)}

    # A second anonymous client from the same address: refused, told when to retry.
    code, answer = await refused(ingress)
    assert code == CLOSE_TOO_MANY
    assert answer["type"] == "error" and answer["retry_after"] == COOLDOWN
    assert "holds 1 anonymous feed sessions" in str(answer["message"])

    # The first one gone and back at once: faster than the cooldown.
    await fake.close()
    await until(lambda: _count(ingress, 1), HOP_TIMEOUT, "the anonymous client gone")
    code, answer = await refused(ingress)
    assert code == CLOSE_TOO_MANY
    retry_after = answer["retry_after"]
    assert isinstance(retry_after, float) and 0 < retry_after <= COOLDOWN
    assert "too fast: retry in" in str(answer["message"])

    # The keyed relay stayed linked through all of it, and still counts.
    assert await children(ingress) == 1
    async with publisher(ingress, 1) as pub, asyncio.timeout(HOP_TIMEOUT):
        assert (await pub.push(6, payload_of(6))).relays == 1
