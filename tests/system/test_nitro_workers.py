"""Nitro's feed out of a leaf under ``chainrelay serve --workers 2``: every worker serves
``[nitro] listen`` on the one port (SO_REUSEPORT), each taking the stream's frames from the
feeder as it takes every block; a client on either worker gets every message once, in
order, byte for byte as the sequencer sent it (a fake Nitro feed → an entry node of one
process → the leaf's two workers → Nitro-protocol clients).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from chainrelay.devnet import free_port
from tests.lab.fake_nitro_feed import FakeNitroFeed
from tests.lab.nitro_clients import Collector, collecting, has
from tests.lab.nitro_messages import realistic
from tests.lab.procs import ROOT, Procs, Relay, relay_config, until
from tests.lab.timing import SECOND
from tests.system.test_nitro_feed import CHAIN_ID, FIRST, SEQUENCER, entry_toml, leaf_toml

pytestmark = pytest.mark.lab

TIMEOUT = 30 * SECOND
# Clients opened at most until each worker serves one (the kernel spreads connections by
# their addresses and ports: 12 all on one worker is a chance of 1 in 2,048).
MAX_CLIENTS = 12


async def clients_per_worker(leaf: Relay) -> dict[str, float]:
    """Each worker's ``chainrelay_nitro_clients``, by worker: scrapes (each answered by
    one worker, a new connection each) until both have answered."""
    seen: dict[str, float] = {}

    async def both() -> bool:
        m = await leaf.metrics()
        worker = next((k.split('"')[1] for k in m if k.startswith("chainrelay_worker{")), None)
        if worker is not None:
            seen[worker] = m.get("chainrelay_nitro_clients", 0.0)
        return len(seen) == 2

    await until(both, TIMEOUT, "both workers to answer a scrape")
    return seen


async def test_every_worker_serves_the_nitro_feed(
    procs: Procs,
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=CHAIN_ID, block_time=1.0)
    msgs = realistic(30, first_seq=FIRST, signer=SEQUENCER, chain_id=CHAIN_ID, sizes=(500, 5000))
    async with FakeNitroFeed(CHAIN_ID) as feed:
        feed.publish(msgs[:10])
        entry = await relay_factory(
            [anvil.ws_url],
            entry_toml(feed, free_port(), tmp_path / "nitro.sqlite"),
            name="entry",
        )
        leaf_port = free_port()
        leaf = Relay(
            procs, relay_config([anvil.ws_url], leaf_toml(entry, leaf_port)), tmp_path, "leaf"
        )
        cmd = [sys.executable, "-m", "chainrelay", "serve", "--config", str(leaf.config_path)]
        with leaf.log_path.open("ab") as log:
            leaf.proc = procs.spawn(
                [*cmd, "--workers", "2"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        await leaf.wait_ready()
        url = f"ws://127.0.0.1:{leaf_port}"

        clients: list[Collector] = []
        try:
            # Clients until each worker serves at least one.
            while True:
                c = Collector(url, FIRST)
                clients.append(c)
                await has(c, feed.sent, FIRST, FIRST + 10, TIMEOUT)
                per_worker = await clients_per_worker(leaf)
                if all(n >= 1 for n in per_worker.values()) or len(clients) >= MAX_CLIENTS:
                    break
            assert all(n >= 1 for n in per_worker.values()), per_worker
            assert sum(per_worker.values()) == len(clients)

            # Live, some broadcasts holding several messages: every client, on either
            # worker, gets each once, in order, exactly.
            for i in range(10, 30, 5):
                feed.publish(msgs[i : i + 5])
            for c in clients:
                await has(c, feed.sent, FIRST, FIRST + 30, TIMEOUT)
                assert len(c.messages()) == 30
        finally:
            async with collecting(*clients):
                pass
        text = leaf.log_path.read_text()
        assert text.count("nitro feed of arbitrum/nitro-feed served on") == 2
