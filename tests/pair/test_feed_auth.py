"""Who a feed child is, end to end in memory: a hub with ``child_keys`` and its children over
``tests.pair.feedpair`` links. A keyed ``FeedLink`` answers the hub's challenge on its own;
a plain child stays an anonymous subscriber, served but never counted for an
acknowledgement that waits for relays; a wrong key is told 4401; anonymous children past
their address's share or reconnecting too fast are told 4429 and when to retry, and the
link waits that long."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chainrelay.metrics import Metrics
from chainrelay.tree.auth import ChildKeys, Credentials
from chainrelay.tree.frame import Signer, keccak
from chainrelay.tree.hub import FeedChild, FeedHub, HubLimits
from chainrelay.tree.link import FeedLink
from chainrelay.tree.session import CLOSE_TOO_MANY, Want, encode_held
from chainrelay.tree.streams import BatchSpec, BatchStream
from tests.lab.procs import until
from tests.pair.feedpair import MemoryDialer, Pair, connect
from tests.pair.test_batch_hub import CHAIN, FRAMES, SEQUENCER, WAIT, S, closes, welcomed

CHILD = Signer(keccak(b"feed auth pair child"))
STRANGER = Signer(keccak(b"feed auth pair stranger"))
CHILD_HEX = "0x" + CHILD.address.hex()
SECRET = "the relays' shared secret"


def keyed_hub(keys: list[str] | None = None, **limits: Any) -> FeedHub:
    """An ingress of ``S`` holding batches 0-9, whose children prove one of ``keys``."""
    spec = BatchSpec(S, CHAIN, frozenset({SEQUENCER.address}))
    h = FeedHub(
        [],
        Metrics(),
        batches=[spec],
        limits=HubLimits(**limits),
        child_keys=ChildKeys.of([CHILD_HEX, SECRET] if keys is None else keys),
    )
    for seq in range(10):
        h.publish(FRAMES[seq])
    return h


def dial(
    monkeypatch: pytest.MonkeyPatch,
    hub: FeedHub,
    credentials: Credentials | None,
    *,
    node: str = "relay-keyed",
    dialer: MemoryDialer | None = None,
    retry_delay: float = 0.01,
) -> tuple[FeedLink, MemoryDialer]:
    """A relay's ``FeedLink`` to ``hub`` (in memory) with ``credentials``; not started."""
    dialer = dialer or MemoryDialer()
    url = dialer.add("parent.test", 80, hub)
    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", dialer.create_connection)
    link = FeedLink(
        url,
        name="parent",
        wants=lambda: [Want(S, from_position=0)],
        on_frame=lambda _link, _raw: None,
        max_frame_bytes=1 << 20,
        connect_timeout=WAIT,
        retry_delay=retry_delay,
        retry_max=retry_delay,
        ping_interval=WAIT,
        node=node,
        credentials=credentials,
    )
    return link, dialer


def held(hub: FeedHub) -> dict[FeedChild, int]:
    """What each child counted as a relay said it holds of ``S``."""
    st = hub.streams[S]
    assert isinstance(st, BatchStream)
    return st.held


def anonymous(hub: FeedHub, node: str | None = None) -> Pair:
    return connect(hub, [Want(S, from_position=0)], node=node)


@pytest.mark.parametrize(
    ("creds", "who"),
    [(Credentials(CHILD), CHILD_HEX), (Credentials(secret=SECRET), "child_keys[1]")],
    ids=["node key", "shared secret"],
)
async def test_a_keyed_relay_proves_itself_and_only_its_held_counts(
    monkeypatch: pytest.MonkeyPatch, creds: Credentials, who: str
) -> None:
    hub = keyed_hub(child_ping_interval=0.05)
    link, dialer = dial(monkeypatch, hub, creds)
    await link.start()
    try:
        assert await link.wait_connected(WAIT)
        relay = dialer.parents[0].session
        assert relay is not None and relay.proven == who and relay.relay
        # A child that names itself a relay but proves nothing: served, not counted.
        impostor = anonymous(hub, node="relay-impostor")
        await welcomed(impostor)
        assert impostor.session.proven is None and not impostor.session.relay
        # The relay's round trip is timed by the hub's pings; a subscriber is not pinged.
        await until(lambda: relay.rtt is not None, WAIT, "the relay's round trip")
        assert 0 < (relay.rtt or 0) < WAIT and impostor.session.rtt is None
        two = hub.wait_held(S, 5, 2)
        one = hub.wait_held(S, 5, 1)
        impostor.child.send_text(encode_held(S, 9))
        link.held(S, 9)
        assert await asyncio.wait_for(one, WAIT) == 1
        assert list(held(hub)) == [relay]
        assert not two.done()
        two.cancel()
    finally:
        await link.stop()
        await hub.stop()


async def test_one_key_is_one_relay_whatever_names_its_hellos_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = Signer(keccak(b"feed auth pair other child"))
    hub = keyed_hub([CHILD_HEX, "0x" + other.address.hex()])
    dialer = MemoryDialer()
    links = [
        dial(monkeypatch, hub, Credentials(key), node=name, dialer=dialer)[0]
        for key, name in ((CHILD, "relay-a"), (CHILD, "relay-b"), (other, "relay-c"))
    ]
    for link in links[:2]:
        await link.start()
    try:
        for link in links[:2]:
            assert await link.wait_connected(WAIT)
        two = hub.wait_held(S, 5, 2)
        for link in links[:2]:
            link.held(S, 5)
        await until(lambda: len(held(hub)) == 2, WAIT, "both sessions' held")
        assert not two.done()  # two names, one key: one relay
        await links[2].start()
        assert await links[2].wait_connected(WAIT)
        links[2].held(S, 5)
        assert await asyncio.wait_for(two, WAIT) == 2
    finally:
        for link in links:
            await link.stop()
        await hub.stop()


async def test_a_relay_with_a_key_not_listed_is_closed_4401_and_told_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = keyed_hub()
    # It does not dial again within the test: what is asserted is the state between tries.
    link, _ = dial(monkeypatch, hub, Credentials(STRANGER), retry_delay=60.0)
    await link.start()
    try:
        await until(lambda: closes(hub, "auth_unknown_key") >= 1, WAIT, "the refusal")
        await until(lambda: link.last_error is not None, WAIT, "the link to hear it")
        assert "not among" in (link.last_error or "") and not link.connected
        assert hub.children == set() and hub.admission.sessions == 0
    finally:
        await link.stop()
        await hub.stop()


async def test_a_keyed_relay_links_to_a_hub_without_keys_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = keyed_hub(keys=[])
    link, dialer = dial(monkeypatch, hub, Credentials(CHILD))
    named = anonymous(hub, node="relay-named")  # an older relay: no proof, named
    await link.start()
    try:
        assert await link.wait_connected(WAIT)
        await welcomed(named)
        session = dialer.parents[0].session
        assert session is not None and session.proven is None and session.relay
        fut = hub.wait_held(S, 5, 2)
        link.held(S, 5)
        named.child.send_text(encode_held(S, 5))
        assert await asyncio.wait_for(fut, WAIT) == 2
    finally:
        await link.stop()
        await hub.stop()


async def test_anonymous_children_past_their_share_or_too_fast_are_told_4429_and_when(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = keyed_hub(anon_per_address=1, anon_reconnect_cooldown=30.0)
    first = anonymous(hub)
    await welcomed(first)
    second = anonymous(hub)
    await asyncio.wait_for(second.child.lost.wait(), WAIT)
    assert second.child.close_code == CLOSE_TOO_MANY and second.child.welcome is None
    error = second.child.texts[-1]
    assert error["type"] == "error" and error["retry_after"] == 30.0
    assert "127.0.0.1 holds 1 anonymous" in error["message"]
    first.to_parent.close()
    await until(lambda: hub.admission.sessions == 0, WAIT, "the first child gone")
    third = anonymous(hub)  # back at once: faster than the cooldown
    await asyncio.wait_for(third.child.lost.wait(), WAIT)
    assert third.child.close_code == CLOSE_TOO_MANY
    assert 25.0 < third.child.texts[-1]["retry_after"] <= 30.0
    assert "too fast" in third.child.texts[-1]["message"]
    assert closes(hub, "anon_per_address") == 1 and closes(hub, "anon_cooldown") == 1
    # A relay from the same address is none of that.
    link, _ = dial(monkeypatch, hub, Credentials(CHILD))
    await link.start()
    try:
        assert await link.wait_connected(WAIT)
    finally:
        await link.stop()
        await hub.stop()


async def test_a_refused_link_waits_the_retry_after_it_was_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cooldown = 0.5
    hub = keyed_hub(anon_per_address=1, anon_reconnect_cooldown=cooldown)
    holder = anonymous(hub)
    await welcomed(holder)
    link, _ = dial(monkeypatch, hub, None, retry_delay=0.01)
    loop = asyncio.get_running_loop()
    await link.start()
    try:
        await until(lambda: link.failures >= 1, WAIT, "the first refusal")
        t0 = loop.time()
        await until(lambda: link.failures >= 2, WAIT + cooldown, "the second refusal")
        # Its own back-off is 0.01 s: only the parent's word made it wait.
        assert loop.time() - t0 >= 0.8 * cooldown
    finally:
        await link.stop()
        await hub.stop()
