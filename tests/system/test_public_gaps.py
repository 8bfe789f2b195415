"""A real relay as a public URL shows it: the admin listener on loopback by default (and a
second node left at that default refusing to start, saying why), and filters held to the
eth_getLogs guards at creation, against a real anvil.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chainrelay.defaults import ADMIN_LISTEN
from chainrelay.devnet import free_port
from tests.lab.chain import metric, wait_same_head
from tests.lab.procs import AnvilFactory, Procs, Relay, RelayFactory, rpc, until
from tests.lab.timing import SECOND
from tests.system.test_filters import (
    A0,
    A1,
    SETTLE_TIMEOUT,
    lab_of,
    mine_block,
    poll_until,
    raw,
)

pytestmark = pytest.mark.lab


async def status_of(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def test_the_admin_listener_is_on_loopback_by_default_and_a_taken_port_is_said_plainly(
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
    await refused_at_start(
        Relay(procs, text, tmp_path, "second"),
        f"server.admin_listen: cannot listen on {ADMIN_LISTEN}",
    )
    # The first node serves on, untouched.
    assert (await rpc(first.url, "eth_chainId"))["result"] == "0x38"
    # A node given its own admin port, whose operator wants the metrics public too.
    own = text.replace("\n\n", f'\nadmin_listen = ":{free_port()}"\npublic_metrics = true\n\n', 1)
    third = Relay(procs, own, tmp_path, "third")
    third.start()
    await third.wait_ready()
    status, body = await status_of(third.url + "/metrics")
    assert status == 200 and "chainrelay_requests_total" in body
    # A node whose public port another holds: the same kind of refusal, naming its key.
    taken = first.url.removeprefix("http://")
    fourth_text = text.replace('"{listen}"', f'"{taken}"\nadmin_listen = ""')
    await refused_at_start(
        Relay(procs, fourth_text, tmp_path, "fourth"), f"server.listen: cannot listen on {taken}"
    )


async def refused_at_start(node: Relay, why: str) -> None:
    """``node`` started exits with a config error (exit code 2) saying ``why``, and no
    traceback."""
    node.start()
    proc = node.proc
    assert proc is not None
    await until(lambda: proc.poll() is not None, 20 * SECOND, "the refused node to exit")
    out = node.log_path.read_text()
    assert proc.returncode == 2, out[-2000:]
    assert why in out, out[-2000:]
    assert "Traceback" not in out


async def test_filters_past_a_logs_guard_are_refused_at_creation_through_a_real_relay(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory
) -> None:
    extra = "[logs]\nmax_block_range = 4\nmax_addresses = 2\n"
    async with lab_of(anvil_factory, relay_factory, extra=extra) as lab:
        head, _ = await lab.node.head()
        wide = {"fromBlock": "latest", "toBlock": hex(head + 10)}
        many = {"address": [lab.emitter, A0, A1]}
        for obj, guard, value in [
            (wide, "logs.max_block_range", 4),
            (many, "logs.max_addresses", 2),
        ]:
            error = (await raw(lab.through, "eth_newFilter", [obj]))["error"]
            assert error["code"] == -32005, error
            assert error["data"] == {"limit": guard, "value": value}
            assert error["message"].startswith("eth_newFilter is limited to ")
        # Within the guards: installed, and it collects as before.
        fid = (await raw(lab.through, "eth_newFilter", [{"fromBlock": hex(head)}]))["result"]
        got: list[Any] = []
        await mine_block(lab, 0)
        await poll_until(lab.through, fid, got, lambda h: len(h) == 1, "the filter's log")
        # Its range grows with the chain: past the guard, its logs are refused, not read.
        for i in range(1, 5):
            await mine_block(lab, i)
        await wait_same_head(lab.through, lab.node, SETTLE_TIMEOUT)
        error = (await raw(lab.through, "eth_getFilterLogs", [fid]))["error"]
        assert error["code"] == -32005 and error["data"]["limit"] == "logs.max_block_range"
        assert error["message"].startswith("eth_getFilterLogs is limited to a 4 block range")
        await poll_until(lab.through, fid, got, lambda h: len(h) == 5, "the next four logs")
        assert metric(await lab.relay.metrics(), "chainrelay_filters") == 1
