"""One relay for a whole module of attacks: anvil as Arbitrum's chain, and a chainrelay node
that is an ingress of the lab's batch stream (a durable log, the lab sequencer's API key),
so every endpoint a client can reach is there: JSON-RPC over HTTP and WebSocket with
subscriptions, the feed (``/feed``), the range endpoint and pushes (``/batches``).

Started once per module (a node start costs seconds; an attack, a fraction of one), with
its own ``Procs``, stopped by PID when the module is done::

    @pytest.fixture(scope="module")
    def node(tmp_path_factory) -> Iterator[HostileNode]:
        with hostile_node(tmp_path_factory.mktemp("n"), LOWERED_BOUNDS) as n:
            yield n
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chainrelay.clients.publisher import Publisher
from chainrelay.devnet import Anvil
from tests.lab.batches import (
    API_KEY,
    CHAIN_ID,
    READ_TIMEOUT,
    SEQUENCER_HEX,
    SEQUENCER_KEY,
    STREAM,
    batches_toml,
    payload_of,
)
from tests.lab.procs import Procs, Relay, relay_config
from tests.lab.timing import SECOND


@dataclass
class HostileNode:
    anvil: Anvil
    relay: Relay
    pushed: int = 0  # batches of STREAM pushed so far: seqs [0, pushed)

    @property
    def pid(self) -> int:
        assert self.relay.proc is not None
        return self.relay.proc.pid

    @property
    def port(self) -> int:
        return self.relay.port

    def alive(self) -> bool:
        return self.relay.proc is not None and self.relay.proc.poll() is None

    async def push(self, count: int, size: int, step: int = 10) -> None:
        """``count`` more batches of ``size`` bytes each (lz4 cannot shrink them), ``step``
        at a time as a sequencer sends them, each acknowledged (durable) before this
        returns."""
        first = self.pushed
        async with (
            asyncio.timeout(READ_TIMEOUT),
            Publisher(
                self.relay.ws_url,
                key=SEQUENCER_KEY,
                stream=STREAM,
                chain_id=CHAIN_ID,
                api_key=API_KEY,
            ) as pub,
        ):
            for at in range(first, first + count, step):
                end = min(at + step, first + count)
                await asyncio.gather(*(pub.submit(s, payload_of(s, size)) for s in range(at, end)))
                self.pushed = end

    def log_problems(self) -> list[str]:
        """Lines of the node's log that must never be there: a traceback (an exception no
        handler expected), a transport's fatal error (one raised out of a protocol
        callback)."""
        text = self.relay.log_path.read_text(errors="replace")
        marks = ("Traceback", "Fatal error")
        return [line for line in text.splitlines() if any(m in line for m in marks)]


@contextlib.contextmanager
def hostile_node(tmp: Path, settings: str = "", batches: str = "") -> Iterator[HostileNode]:
    """Anvil (``CHAIN_ID``, a block a second) and an ingress node on it; ``settings``: more
    TOML (whole sections: ``[limits]``, ``[tree]``) and ``batches`` more ``[batches]``
    lines, e.g. bounds lowered so an attack meets them within seconds."""
    procs = Procs()
    try:
        anvil = Anvil(chain_id=CHAIN_ID, block_time=1.0)
        procs.anvils.append(anvil)
        anvil.start()
        asyncio.run(anvil.wait_ready(20 * SECOND))
        extra = (
            settings
            + "\n"
            + batches_toml(SEQUENCER_HEX, log=tmp / "ingress.sqlite", api_keys=[API_KEY])
        )
        relay = Relay(procs, relay_config([anvil.url], extra), tmp, "hostile")
        relay.start()
        asyncio.run(relay.wait_ready(30 * SECOND))
        yield HostileNode(anvil, relay)
    finally:
        procs.close()
