"""Choosing parents against real servers: a ParentSet with real FeedLinks, probing real local
aiohttp servers.

Pair tier: each candidate parent is a tiny aiohttp server on loopback with a ``/health``
whose answer delay the test sets (it stands for the parent's distance) and a ``/feed``
WebSocket that speaks the session's hello and welcome, then sends one signed frame. A
parent "dies" when its server stops (its sockets close, its port refuses).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import TypedDict, Unpack

import pytest
from aiohttp import WSMsgType, web

from chainrelay.config import TreeConfig
from chainrelay.tree import frame as feedframe
from chainrelay.tree.choice import Candidate
from chainrelay.tree.link import FeedLink
from chainrelay.tree.parents import ParentSet
from chainrelay.tree.session import Want, encode_welcome, parse_hello
from tests.lab.procs import until
from tests.lab.timing import MS, SECOND

STREAM = "devnet/blocks"
SIGNER = feedframe.Signer(bytes.fromhex("11" * 32))
# Distances are what the servers add to each probe, not deadlines: left unscaled. Parents
# that must sort in an order are 60 ms or more apart (a loaded two-core machine adds tens of
# ms to one probe now and then), and every threshold is at least that far from a distance.
D = 0.001
FACTOR = 2.0
GAIN = 30 * D
PROBE_TIMEOUT = 1 * SECOND
# For the test whose probes time out: rounds then take this long each. Twice the farthest
# parent that must still answer in that test (200 ms).
SHORT_PROBE_TIMEOUT = 400 * MS


class TinyParent:
    """One candidate parent: a health endpoint at a set distance and a one-frame feed."""

    def __init__(self, name: str, delay: float) -> None:
        self.name = name
        self.delay = delay
        self.answers = True  # False: /health answers only after the probes gave up
        self.degraded = False  # /health says 503, as a node whose upstreams are down
        self.feed_open = True
        self.hellos = 0
        self.sockets: set[web.WebSocketResponse] = set()
        self.frame = feedframe.encode(
            SIGNER,
            kind=feedframe.KIND_BLOCK,
            stream=STREAM,
            position=len(name),
            identity=feedframe.keccak(name.encode()),
            plain=b'{"from":"' + name.encode() + b'"}\x00null',
        )
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/feed", self._feed)
        self.runner = web.AppRunner(app, handle_signals=False)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/feed"

    async def start(self) -> None:
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()

    async def send(self, raw: bytes) -> None:
        """A frame to every child linked now (a parent that sends nothing more: ``quiet``)."""
        for ws in list(self.sockets):
            if not ws.closed:
                await ws.send_bytes(raw)

    async def kill(self) -> None:
        """Stop serving: open feeds are closed and the port refuses from now on."""
        for ws in list(self.sockets):
            await ws.close()
        await self.runner.cleanup()

    async def _health(self, _req: web.Request) -> web.Response:
        await asyncio.sleep(self.delay if self.answers else 3 * SHORT_PROBE_TIMEOUT)
        if self.degraded:
            return web.json_response({"status": "degraded"}, status=503)
        return web.json_response({"status": "ok"})

    async def _feed(self, req: web.Request) -> web.StreamResponse:
        if not self.feed_open:
            return web.Response(status=404, text="no feed here")
        ws = web.WebSocketResponse()
        await ws.prepare(req)
        self.sockets.add(ws)
        try:
            hello = parse_hello(await ws.receive_str())
            self.hellos += 1
            streams = [{"stream": w.stream, "oldest": None, "newest": None} for w in hello.wants]
            await ws.send_str(encode_welcome(streams).decode())
            await ws.send_bytes(self.frame)
            async for msg in ws:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
        finally:
            self.sockets.discard(ws)
        return ws


class TreeChanges(TypedDict, total=False):
    """The [tree] settings the lab sets, and a test may change."""

    probe_interval: float
    connect_timeout: float
    retry_delay: float
    retry_max: float
    ping_interval: float
    degrade_factor: float
    min_gain: float
    down_hold: float
    probe_timeout: float
    stall_rounds: int


class Lab:
    """Candidate parents and the ParentSet choosing among them, with what it did."""

    def __init__(self) -> None:
        self.servers: dict[str, TinyParent] = {}
        self.regions: dict[str, str] = {}
        self.frames: list[tuple[str, bytes]] = []
        self.changes: list[list[str]] = []
        # (name, started, {linked name: connected} right after the event)
        self.link_events: list[tuple[str, bool, dict[str, bool]]] = []
        self.set: ParentSet | None = None

    async def parent(self, name: str, region: str, delay_ms: float) -> TinyParent:
        p = TinyParent(name, delay_ms * D)
        await p.start()
        self.servers[name] = p
        self.regions[name] = region
        return p

    async def start(self, *, k: int = 2, **kwargs: Unpack[TreeChanges]) -> ParentSet:
        cands = [Candidate(n, p.url, self.regions[n]) for n, p in self.servers.items()]

        def on_link(name: str, started: bool) -> None:
            assert self.set is not None
            snapshot = {n: link.connected for n, link in self.set.links.items()}
            self.link_events.append((name, started, snapshot))

        def on_frame(link: FeedLink, raw: bytes) -> None:
            self.frames.append((link.name, raw))

        settings: TreeChanges = {
            "probe_interval": 50 * MS,
            "connect_timeout": 2 * SECOND,
            "retry_delay": 50 * MS,
            "retry_max": 200 * MS,
            "ping_interval": 1 * SECOND,
            "degrade_factor": FACTOR,
            "min_gain": GAIN,
            "down_hold": 60 * SECOND,
            "probe_timeout": PROBE_TIMEOUT,
        }
        settings.update(kwargs)
        tree = TreeConfig(parents_k=k, max_frame_bytes=1 << 20, **settings)
        self.set = ParentSet(
            cands,
            tree,
            wants=lambda: [Want(STREAM, last=1)],
            on_frame=on_frame,
            on_change=self.changes.append,
            on_link=on_link,
        )
        await self.set.start()
        return self.set

    async def linked(self, names: list[str], what: str) -> None:
        """Wait until exactly ``names`` (fastest first) are the parents, each connected and
        each having delivered its frame."""
        ps = self.set
        assert ps is not None

        def done() -> bool:
            got = {n for n, _ in self.frames}
            return (
                ps.parents == names
                and set(ps.links) == set(names)
                and all(ps.links[n].connected for n in names)
                and set(names) <= got
            )

        await until(done, 10 * SECOND, what)

    async def stop(self) -> None:
        if self.set is not None:
            await self.set.stop()
        for p in self.servers.values():
            await p.kill()


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        await lab.stop()


async def test_picks_the_two_fastest_in_different_regions(lab: Lab) -> None:
    await lab.parent("eu-1", "eu", 20)
    await lab.parent("eu-2", "eu", 80)  # second fastest, but eu-1's region
    await lab.parent("us-1", "us", 400)
    await lab.parent("ap-1", "ap", 200)
    ps = await lab.start()
    await lab.linked(["eu-1", "ap-1"], "eu-1 and ap-1 linked")
    assert lab.servers["eu-2"].hellos == lab.servers["us-1"].hellos == 0
    # Each parent's frame came through its own link, untouched.
    assert dict(lab.frames)["eu-1"] == lab.servers["eu-1"].frame
    assert dict(lab.frames)["ap-1"] == lab.servers["ap-1"].frame
    rtts = {n: c.rtt for n, c in ps.candidates.items() if c.rtt is not None}
    assert len(rtts) == len(ps.candidates), "a candidate has no rtt"
    assert rtts["eu-1"] < rtts["eu-2"] < rtts["ap-1"] < rtts["us-1"]
    assert lab.changes == [["eu-1", "ap-1"]]


async def test_a_dead_parent_is_replaced_by_a_third_linked_before_it_is_dropped(
    lab: Lab,
) -> None:
    await lab.parent("eu-1", "eu", 20)
    us = await lab.parent("us-1", "us", 80)
    await lab.parent("ap-1", "ap", 200)
    ps = await lab.start()
    await lab.linked(["eu-1", "us-1"], "the two nearest linked")
    before = len(lab.link_events)

    await us.kill()
    await lab.linked(["eu-1", "ap-1"], "ap-1 linked in the dead us-1's place")
    events = lab.link_events[before:]
    assert [(n, started) for n, started, _ in events] == [("ap-1", True), ("us-1", False)]
    # When the dead parent was dropped, its successor was already connected: the node
    # never had fewer parents linked than before.
    _, _, at_drop = events[1]
    assert at_drop == {"eu-1": True, "ap-1": True}
    assert not ps.candidates["us-1"].up
    assert lab.changes == [["eu-1", "us-1"], ["eu-1", "ap-1"]]


async def test_a_dead_parent_is_replaced_without_waiting_for_the_next_probe_round(
    lab: Lab,
) -> None:
    await lab.parent("eu-1", "eu", 20)
    us = await lab.parent("us-1", "us", 80)
    await lab.parent("ap-1", "ap", 200)
    ps = await lab.start(probe_interval=120 * SECOND)  # past the test's own timeout
    await lab.linked(["eu-1", "us-1"], "the two nearest linked")
    assert ps.rounds == 1

    await us.kill()
    await lab.linked(["eu-1", "ap-1"], "ap-1 linked once us-1's link failed")
    assert ps.rounds == 2


async def test_a_slowed_parent_is_replaced_only_past_the_hysteresis(lab: Lab) -> None:
    await lab.parent("eu-1", "eu", 20)
    us1 = await lab.parent("us-1", "us", 40)
    await lab.parent("us-2", "us", 100)
    ps = await lab.start()
    await lab.linked(["eu-1", "us-1"], "eu-1 and us-1 linked")

    # 1.3 times us-2's distance and 30 ms worse: 70 ms short of the factor of 2 (200 ms), so
    # us-1 stays even when a busy machine adds to its probes.
    us1.delay = 130 * D
    us1_rtt = ps.candidates["us-1"]
    await until(lambda: (us1_rtt.rtt or 0) > 120 * D, 10 * SECOND, "us-1 measured slower")
    rounds = ps.rounds
    await until(lambda: ps.rounds >= rounds + 10, 20 * SECOND, "ten more rounds")
    assert ps.parents == ["eu-1", "us-1"]
    assert set(ps.links) == {"eu-1", "us-1"}
    assert lab.servers["us-2"].hellos == 0

    # Four times us-2's distance: replaced.
    us1.delay = 400 * D
    await lab.linked(["eu-1", "us-2"], "us-2 linked in the slow us-1's place")
    assert lab.changes == [["eu-1", "us-1"], ["eu-1", "us-2"]]
    assert 200 * D < (us1_rtt.rtt or 0)  # replaced only once past the factor
    # The slowed parent is still up, just further: it stays a candidate.
    assert us1_rtt.up


async def test_a_parent_whose_feed_keeps_failing_is_held_down(lab: Lab) -> None:
    broken = await lab.parent("eu-1", "eu", 20)
    broken.feed_open = False  # answers /health, refuses /feed
    await lab.parent("us-1", "us", 80)
    await lab.parent("ap-1", "ap", 200)
    ps = await lab.start()
    await lab.linked(["us-1", "ap-1"], "the two parents with a working feed linked")
    eu = ps.candidates["eu-1"]
    assert not eu.up and eu.failures >= 3
    # Held down though its probes answer: not linked again while the hold lasts.
    rounds = ps.rounds
    await until(lambda: ps.rounds >= rounds + 10, 10 * SECOND, "ten more rounds")
    assert "eu-1" not in ps.links and not eu.up
    assert [n for n, started, _ in lab.link_events if started].count("eu-1") == 1


async def test_a_linked_parent_whose_probes_fail_stays_while_its_feed_is_up(lab: Lab) -> None:
    eu = await lab.parent("eu-1", "eu", 20)
    await lab.parent("us-1", "us", 80)
    await lab.parent("ap-1", "ap", 200)
    ps = await lab.start(ping_interval=100 * MS, probe_timeout=SHORT_PROBE_TIMEOUT)
    await lab.linked(["eu-1", "us-1"], "the two nearest linked")
    await until(lambda: ps.links["eu-1"].rtt is not None, 5 * SECOND, "eu-1's link's ping")

    eu.answers = False  # its probes now time out; its feed session is untouched
    rounds = ps.rounds
    await until(lambda: ps.rounds >= rounds + 5, 10 * SECOND, "five more rounds")
    assert ps.parents == ["eu-1", "us-1"]
    assert set(ps.links) == {"eu-1", "us-1"} and ps.candidates["eu-1"].up
    assert lab.servers["ap-1"].hellos == 0

    # The feed goes too: now it is down and replaced.
    await eu.kill()
    await lab.linked(["us-1", "ap-1"], "ap-1 linked in eu-1's place")


async def test_a_parent_that_says_degraded_is_still_measured_and_chosen(lab: Lab) -> None:
    eu = await lab.parent("eu-1", "eu", 20)
    eu.degraded = True  # /health says 503: its JSON-RPC upstreams are down, not its feed
    await lab.parent("us-1", "us", 80)
    await lab.parent("ap-1", "ap", 200)
    ps = await lab.start()
    await lab.linked(["eu-1", "us-1"], "the two nearest linked, the degraded one too")
    assert ps.candidates["eu-1"].rtt is not None


async def test_stop_ends_every_link(lab: Lab) -> None:
    await lab.parent("eu-1", "eu", 10)
    await lab.parent("us-1", "us", 20)
    ps = await lab.start()
    await lab.linked(["eu-1", "us-1"], "both linked")
    links = list(ps.links.values())
    await ps.stop()
    assert ps.links == {} and ps.parents == []
    assert not any(link.connected for link in links)
    await until(
        lambda: all(not p.sockets for p in lab.servers.values()), 5 * SECOND, "feeds closed"
    )


async def test_a_parent_that_stays_linked_but_sends_nothing_is_replaced(lab: Lab) -> None:
    await lab.parent("eu-1", "eu", 20)
    await lab.parent("us-1", "us", 200)
    us = lab.servers["us-1"]
    await lab.parent("ap-1", "ap", 400)
    ps = await lab.start(stall_rounds=3)
    await lab.linked(["eu-1", "us-1"], "the two fastest")
    # us-1 keeps its link open and answers its probes, but sends no frame any more, while
    # eu-1 goes on: after three such rounds us-1 is down and ap-1 takes its place.
    n = 0

    async def replaced() -> bool:
        nonlocal n
        n += 1
        frame = feedframe.encode(
            SIGNER,
            kind=feedframe.KIND_BLOCK,
            stream=STREAM,
            position=100 + n,
            identity=feedframe.keccak(b"next %d" % n),
            plain=b"{}\x00null",
        )
        await lab.servers["eu-1"].send(frame)
        return ps.parents == ["eu-1", "ap-1"] and ps.links["ap-1"].connected

    await until(replaced, 10 * SECOND, "the silent parent replaced")
    assert us.sockets == set()  # its link was dropped, the server itself still up
    assert not ps.candidates["us-1"].up


async def test_parents_that_all_fall_quiet_together_are_kept(lab: Lab) -> None:
    await lab.parent("eu-1", "eu", 20)
    await lab.parent("us-1", "us", 200)
    await lab.parent("ap-1", "ap", 400)
    ps = await lab.start(stall_rounds=2)
    await lab.linked(["eu-1", "us-1"], "the two fastest")
    rounds = ps.rounds

    async def several_rounds() -> bool:
        return ps.rounds >= rounds + 6

    await until(several_rounds, 10 * SECOND, "six quiet rounds")
    assert ps.parents == ["eu-1", "us-1"]  # a quiet chain is no stalled parent
