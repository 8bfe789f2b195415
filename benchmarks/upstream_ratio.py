"""Upstream calls per 1,000 client requests under a dapp-like mix.

anvil mines a block a second and carries real traffic (``chainrelay.devnet.traffic``:
transfers and Transfer-log emitting calls). Many simulated users poll a relay, each once a
second (jittered), each poll a few sequential calls:

* eth_blockNumber, eth_getBlockByNumber("latest", false)
* eth_getBalance and eth_getTransactionCount at "latest" of the user's account (20 shared
  accounts)
* eth_call at "latest" on a contract (5 distinct calls)
* every other poll: eth_getLogs of the emitter's Transfer logs over the last 10 blocks
  (explicit numbers, from the user's eth_blockNumber)
* the receipt of one transaction of the latest block, when it has any
* every fifth poll: eth_chainId

``--mix scans`` adds indexers: one user in ``SCANNER_EVERY`` instead scans the emitter's
logs from block 0 to "latest" on every poll (a wide eth_getLogs, split by the relay in
chunks of ``SCAN_SPLIT_BLOCKS`` over a chain of ``SCAN_HISTORY`` blocks mined first), as an
indexer re-scanning history does. Each mix writes its own section of RESULTS.md
(``upstream_ratio``, ``upstream_ratio_scans``; ``upstream_ratio_routing`` with
``--routing``).

The relay reaches anvil through ``tests/lab/counting_proxy.py``, a transparent proxy that
counts every call it forwards, so the count includes the head tracker's own calls; the relay's
``chainrelay_upstream_calls_total`` (all labels summed) is reported next to it. Both
upstream transports run, one after the other: WebSocket (newHeads) and HTTP (polling).

Each upstream's share of the upstream calls per 1,000 client calls is reported too (from
``chainrelay_upstream_calls_total`` by upstream), so an operator sees what each provider
is billed. With ``--routing`` the relay has a pool of three in front of the same anvil:
the primary above, a rate-limited provider (``tests/lab/fault_upstream.py`` mode ``rate``:
429 past ``LIMITED_QUOTA`` calls a second, given a budget of ``LIMITED_BUDGET``) as a
second primary, and a paid fallback (``archive = true``) that should be billed only for
what the primaries could not serve.

    python -m benchmarks.upstream_ratio [--users 150] [--window 8] [--windows 3] [--routing]
        [--mix scans]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks import common
from chainrelay.config import HeadConfig
from chainrelay.devnet import (
    DEV_ACCOUNTS,
    TRANSFER_TOPIC,
    traffic,
    transfer_emitter_initcode,
)

GOAL_PER_1000 = 50.0
POLL_SECONDS = 1.0
# eth_getLogs spans the last 10 blocks; the relay knows blocks from its first head on.
COLD_BLOCKS = 10
ACCOUNTS = DEV_ACCOUNTS + ["0x" + f"{0xA11CE + i:040x}" for i in range(17)]
# "latest" keys per block: balance and nonce per account, 5 eth_calls, the block, the logs.
KEYS_PER_BLOCK = 2 * len(ACCOUNTS) + 5 + 1 + 1
HEADERS = {"Content-Type": "application/json"}
# ``--mix scans``: one user in this many is an indexer scanning from block 0 each poll, over
# a chain of this many blocks mined before the run, split by the relay in chunks of this
# many blocks (the whole history is then ~10 chunks, all but the last finalized).
SCANNER_EVERY = 10
SCAN_HISTORY = 2000
SCAN_SPLIT_BLOCKS = 200
# --routing: the rate-limited provider's quota, and the budget the relay keeps for it
# (above the quota: its 429s come, auto-tuning brings the budget under it).
LIMITED_QUOTA = 20
LIMITED_BUDGET = 30


@dataclass
class Load:
    requests: int = 0
    errors: int = 0
    by_method: collections.Counter[str] = field(default_factory=collections.Counter)
    first_errors: list[str] = field(default_factory=list)


@dataclass
class Window:
    seconds: float
    client: int
    errors: int
    relay_requests: float
    metric_upstream: float
    wire: collections.Counter[str]
    served: dict[str, float]
    blocks: int
    # Upstream calls the relay made, by upstream (its metric, every outcome summed).
    by_upstream: dict[str, float] = field(default_factory=dict)

    @property
    def wire_total(self) -> int:
        return sum(self.wire.values())

    def per_1000(self, calls: float) -> float:
        return 1000.0 * calls / self.client if self.client else float("nan")


class Users:
    """The simulated dapp users, all sharing one aiohttp session to the relay."""

    def __init__(self, url: str, emitter: str, echo: str, load: Load, scans: bool = False) -> None:
        self.url = url
        self.emitter = emitter
        self.echo = echo
        self.load = load
        self.scans = scans

    async def call(self, session: aiohttp.ClientSession, method: str, params: list[Any]) -> Any:
        body = common.request_body(method, params, self.load.requests + 1)
        load = self.load
        try:
            async with session.post(self.url, data=body, headers=HEADERS) as r:
                doc = orjson.loads(await r.read())
        except (aiohttp.ClientError, OSError, orjson.JSONDecodeError) as exc:
            doc = {"error": repr(exc)}
        load.requests += 1
        load.by_method[method] += 1
        if "error" in doc:
            load.errors += 1
            if len(load.first_errors) < 5:
                load.first_errors.append(f"{method}{params}: {doc['error']}")
            return None
        return doc.get("result")

    async def user(self, i: int, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        rng = random.Random(i)
        acct = ACCOUNTS[i % len(ACCOUNTS)]
        call = self.call
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):  # random phase: users do not poll in step
            await asyncio.wait_for(stop.wait(), rng.random() * POLL_SECONDS)
        tick = 0
        scanner = self.scans and i % SCANNER_EVERY == 0
        while not stop.is_set():
            started = loop.time()
            if scanner:
                scan = {"fromBlock": "0x0", "toBlock": "latest", "address": self.emitter}
                await call(session, "eth_getLogs", [scan])
                pause = POLL_SECONDS * rng.uniform(0.8, 1.2) - (loop.time() - started)
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
                continue
            head = await call(session, "eth_blockNumber", [])
            block = await call(session, "eth_getBlockByNumber", ["latest", False])
            await call(session, "eth_getBalance", [acct, "latest"])
            await call(session, "eth_getTransactionCount", [acct, "latest"])
            data = common.word(i % 5)
            await call(session, "eth_call", [{"to": self.echo, "data": data}, "latest"])
            if tick % 2 == 0 and isinstance(head, str):
                top = int(head, 16)
                flt = {
                    "fromBlock": hex(max(0, top - 9)),
                    "toBlock": hex(top),
                    "address": self.emitter,
                    "topics": [TRANSFER_TOPIC],
                }
                await call(session, "eth_getLogs", [flt])
            txs = block.get("transactions") if isinstance(block, dict) else None
            if txs:
                await call(session, "eth_getTransactionReceipt", [rng.choice(txs)])
            if tick % 5 == 0:
                await call(session, "eth_chainId", [])
            tick += 1
            pause = POLL_SECONDS * rng.uniform(0.8, 1.2) - (loop.time() - started)
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)


async def _head(session: aiohttp.ClientSession, relay_url: str) -> int:
    body = common.request_body("eth_blockNumber", [], "probe")
    async with session.post(relay_url, data=body, headers=HEADERS) as r:
        return int(orjson.loads(await r.read())["result"], 16)


async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as r:
        return await r.read()


async def snapshot(
    session: aiohttp.ClientSession, relay_url: str, counter_url: str, load: Load
) -> tuple[float, int, int, dict[str, float], collections.Counter[str]]:
    wire, metrics_text = await asyncio.gather(
        _get(session, counter_url + "/counts"), _get(session, relay_url + "/metrics")
    )
    metrics = common.parse_metrics(metrics_text.decode())
    return (
        time.monotonic(),
        load.requests,
        load.errors,
        metrics,
        collections.Counter(orjson.loads(wire)),
    )


async def drive(
    relay_url: str, counter_url: str, anvil_url: str, emitter: str, echo: str, args: Any
) -> list[Window]:
    """Traffic on anvil, users on the relay: the cold-start ``Window``, then one per
    measured interval."""
    load = Load()
    users = Users(relay_url + "/", emitter, echo, load, args.mix == "scans")
    stop = asyncio.Event()
    windows: list[Window] = []
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
        first_head = await _head(session, relay_url)
        tg.create_task(traffic(anvil_url, stop, emitter=emitter))
        for i in range(args.users):
            tg.create_task(users.user(i, session, stop))
        try:
            # Cold start: until the relay has seen COLD_BLOCKS heads, the eth_getLogs range
            # reaches blocks older than its first head, whose hashes it does not know.
            before = await snapshot(session, relay_url, counter_url, load)
            deadline = time.monotonic() + COLD_BLOCKS * 3
            while await _head(session, relay_url) < first_head + COLD_BLOCKS:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay head did not advance {COLD_BLOCKS} blocks")
                await asyncio.sleep(0.2)
            after = await snapshot(session, relay_url, counter_url, load)
            windows.append(_window(before, after))
            before = after
            for _ in range(args.windows):
                await asyncio.sleep(args.window)
                after = await snapshot(session, relay_url, counter_url, load)
                windows.append(_window(before, after))
                before = after
        finally:
            stop.set()
    if load.first_errors:
        print("client errors, first few:\n  " + "\n  ".join(load.first_errors), flush=True)
    return windows


def _window(before: Any, after: Any) -> Window:
    t0, n0, e0, m0, w0 = before
    t1, n1, e1, m1, w1 = after
    served = {
        o: common.metric(m1, "chainrelay_requests_total", outcome=o)
        - common.metric(m0, "chainrelay_requests_total", outcome=o)
        for o in ("hit", "local", "miss", "pass", "error")
    }
    names = {
        key.split('upstream="', 1)[1].split('"', 1)[0]
        for key in m1
        if key.startswith("chainrelay_upstream_calls_total{") and 'upstream="' in key
    }
    by_upstream = {
        name: common.metric(m1, "chainrelay_upstream_calls_total", upstream=name)
        - common.metric(m0, "chainrelay_upstream_calls_total", upstream=name)
        for name in sorted(names)
    }
    return Window(
        by_upstream=by_upstream,
        seconds=t1 - t0,
        client=n1 - n0,
        errors=e1 - e0,
        relay_requests=common.metric(m1, "chainrelay_requests_total")
        - common.metric(m0, "chainrelay_requests_total"),
        metric_upstream=common.metric(m1, "chainrelay_upstream_calls_total")
        - common.metric(m0, "chainrelay_upstream_calls_total"),
        wire=w1 - w0,
        served=served,
        blocks=int(
            common.metric(m1, "chainrelay_head_block") - common.metric(m0, "chainrelay_head_block")
        ),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=150)
    ap.add_argument("--window", type=float, default=8.0, help="seconds per measured window")
    ap.add_argument("--windows", type=int, default=3, help="windows per transport")
    ap.add_argument(
        "--transport", choices=("ws", "http", "both"), default="both", help="relay -> anvil"
    )
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument(
        "--mix",
        choices=("dapp", "scans"),
        default="dapp",
        help="scans: one user in 10 scans the logs from block 0 each poll (an indexer)",
    )
    ap.add_argument(
        "--routing",
        action="store_true",
        help="a pool: the primary, a rate-limited primary and a paid fallback",
    )
    ap.add_argument(
        "--follow-blocks",
        choices=("auto", "always", "never"),
        default=None,
        help="the relay's [subscriptions] follow_blocks (default: the relay's default)",
    )
    args = ap.parse_args(argv)
    transports = ["ws", "http"] if args.transport == "both" else [args.transport]
    per = COLD_BLOCKS * 1.5 + args.window * args.windows + 8
    common.budget(int(40 + per * len(transports)))
    m = common.machine()
    results: dict[str, list[Window]] = {}
    paid_calls: dict[str, dict[str, int]] = {}
    paid_seen: collections.Counter[str] = collections.Counter()
    with contextlib.ExitStack() as stack:
        anvil = common.start_anvil(block_time=1.0)
        stack.callback(anvil.stop)
        setup = common.RpcClient(anvil.url)
        stack.callback(setup.close)
        emitter = common.deploy(setup, transfer_emitter_initcode())
        echo = common.deploy(setup, common.echo_initcode())
        if args.mix == "scans":
            setup.call("anvil_mine", [hex(SCAN_HISTORY)])
        counter, counter_url = common.start_counter(anvil)
        stack.callback(common.stop_process, counter)
        pool = ""
        paid_url = ""
        if args.routing:
            limited, limited_url = start_limited(anvil)
            stack.callback(common.stop_process, limited)
            paid, paid_url = common.start_counter(anvil)
            stack.callback(common.stop_process, paid)
            pool = (
                "[pool]\nauto_tune = true\n\n"
                f'[[upstreams]]\nname = "limited"\nurl = "{limited_url}"\n'
                f"max_rps = {LIMITED_BUDGET}\n\n"
                f'[[upstreams]]\nname = "paid"\nurl = "{paid_url}"\n'
                'role = "fallback"\narchive = true\n'
            )
        for transport in transports:
            upstream = counter_url.replace("http://", "ws://") if transport == "ws" else counter_url
            toml = f'[subscriptions]\nfollow_blocks = "{args.follow_blocks}"\n'
            toml = toml if args.follow_blocks else ""
            if args.mix == "scans":
                toml += f"[logs]\nsplit_blocks = {SCAN_SPLIT_BLOCKS}\n"
            toml += pool
            relay = common.Relay(upstream, toml=toml)
            try:
                relay.start()
                windows = asyncio.run(drive(relay.url, counter_url, anvil.url, emitter, echo, args))
            finally:
                relay.stop()
            results[transport] = windows
            if paid_url:  # what the fallback was asked, by method, over this relay's run
                now = collections.Counter(orjson.loads(common.http_get(paid_url + "/counts")))
                paid_calls[transport] = dict(now - paid_seen)
                paid_seen = now
            for k, w in enumerate(windows):
                print(
                    f"{transport:4s} {'cold  ' if k == 0 else 'window'} {w.seconds:4.1f}s: "
                    f"{w.client} client calls "
                    f"({w.client / w.seconds:.0f}/s, {w.errors} errors), upstream "
                    f"{w.wire_total} on the wire ({w.per_1000(w.wire_total):.1f}/1000), "
                    f"{w.metric_upstream:.0f} by metric ({w.per_1000(w.metric_upstream):.1f}/1000)",
                    flush=True,
                )
    text = report(m, results, args, paid_calls)
    print(text)
    if not args.no_write:
        section = "upstream_ratio" + ("_routing" if args.routing else "")
        if args.mix == "scans" and not args.routing:
            section = "upstream_ratio_scans"
        common.write_section(section, text)
    return 0


def start_limited(node: Any) -> tuple[Any, str]:
    """A provider with a quota (``fault_upstream`` mode ``rate``) in front of ``node``."""
    port = common.free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--mode", "rate", "--rps", str(LIMITED_QUOTA), "--upstream", node.url]
    args += ["--port", str(port)]
    proc = common.start_server(
        "tests.lab.fault_upstream", args, lambda: common.http_get(url + "/counts")
    )
    return proc, url


def shares(results: dict[str, list[Window]]) -> list[str]:
    """Each upstream's calls per 1,000 client calls and share of all upstream calls, by
    transport, over the measured windows: what each provider is billed."""
    rows = []
    for transport, (_cold, *ws) in results.items():
        client = sum(w.client for w in ws)
        total: collections.Counter[str] = collections.Counter()
        for w in ws:
            total.update(w.by_upstream)
        every = sum(total.values())
        for name, calls in sorted(total.items()):
            rows.append(
                [
                    transport.upper(),
                    f"`{name}`",
                    f"{1000 * calls / client:.1f}" if client else "-",
                    f"{calls / every:.1%}" if every else "-",
                ]
            )
    return [
        "Each upstream's share (`chainrelay_upstream_calls_total` by upstream, measured "
        "windows): what each provider is billed per 1,000 client calls.",
        "",
        common.table(
            ["transport", "upstream", "calls / 1000 client calls", "share of upstream calls"],
            rows,
        ),
    ]


def report(
    m: dict[str, str],
    results: dict[str, list[Window]],
    args: Any,
    paid_calls: dict[str, dict[str, int]] | None = None,
) -> str:
    rows = []
    verdicts = []
    breakdown: dict[str, collections.Counter[str]] = {}
    clients: dict[str, int] = {}
    for transport, (cold, *ws) in results.items():
        wire = [w.per_1000(w.wire_total) for w in ws]
        metric = [w.per_1000(w.metric_upstream) for w in ws]
        head = [w.per_1000(w.wire_total - w.metric_upstream) for w in ws]
        served = sum(sum(w.served.values()) for w in ws)
        hits = sum(w.served["hit"] + w.served["local"] for w in ws)
        rows.append(
            [
                "WebSocket (newHeads)" if transport == "ws" else "HTTP (polling)",
                f"{common.median([w.client / w.seconds for w in ws]):,.0f}",
                str(sum(w.errors for w in ws)),
                f"{hits / served:.1%}" if served else "-",
                f"**{common.median(wire):.1f}**",
                " / ".join(f"{x:.1f}" for x in wire),
                f"{common.median(metric):.1f}",
                f"{common.median(head):.1f}",
                f"{common.median([w.client / w.blocks if w.blocks else 0.0 for w in ws]):,.0f}",
                f"{cold.per_1000(cold.wire_total):.1f} ({cold.seconds:.0f} s)",
            ]
        )
        verdict = "met" if common.median(wire) <= GOAL_PER_1000 else "not met"
        verdicts.append(
            f"- {transport.upper()} upstream: {common.median(wire):.1f} upstream calls per "
            f"1,000 client requests (on the wire) → goal ≤ {GOAL_PER_1000:.0f} **{verdict}**"
        )
        total: collections.Counter[str] = collections.Counter()
        for w in ws:
            total.update(w.wire)
        breakdown[transport] = total
        clients[transport] = sum(w.client for w in ws)
    methods = sorted(
        {meth for c in breakdown.values() for meth in c},
        key=lambda meth: -sum(c[meth] for c in breakdown.values()),
    )
    method_rows = [
        [f"`{meth}`"]
        + [f"{1000 * breakdown[t][meth] / clients[t]:.1f}" if clients[t] else "-" for t in results]
        for meth in methods
    ]
    return "\n".join(
        [
            "## Upstream calls per 1,000 client requests (`upstream_ratio.py`"
            + (
                f" --mix scans: one user in {SCANNER_EVERY} scans the logs from block 0 each "
                f"poll, over {SCAN_HISTORY:,}+ blocks split in chunks of {SCAN_SPLIT_BLOCKS})"
                if args.mix == "scans"
                else ")"
            ),
            "",
            common.machine_line(m),
            "",
            f"anvil with 1 s blocks and `devnet.traffic` (4 transactions a second); "
            f"{args.users} simulated users polling once a second (mix in the script's "
            f"docstring). Per upstream transport: a cold-start window (from the relay's "
            f"start until it has seen {COLD_BLOCKS} new heads), then {args.windows} windows "
            f"of {args.window:g} s. *Wire* is counted by `tests/lab/counting_proxy.py` between "
            "the relay and anvil and includes the head tracker; *metric* is "
            "`chainrelay_upstream_calls_total`, all labels summed.",
            "",
            common.table(
                [
                    "relay upstream",
                    "client req/s",
                    "client errors",
                    "hit or local",
                    "upstream / 1000, wire (median)",
                    "wire (windows)",
                    "metric",
                    "wire - metric",
                    "client calls per block",
                    "cold start, wire",
                ],
                rows,
            ),
            "",
            *verdicts,
            "",
            *(
                [
                    f"`--routing`: a pool of three in front of the same anvil: `anvil` "
                    f"(primary), `limited` (primary; 429 past {LIMITED_QUOTA} calls a second, "
                    f"max_rps {LIMITED_BUDGET}, auto_tune) and `paid` (fallback, archive). "
                    "*Wire* counts `anvil`'s door only. While a primary serves, `paid`'s "
                    f"head is checked every {HeadConfig().fallback_interval:g} s "
                    "(`[head] fallback_interval`) and it gets no write.",
                    "",
                ]
                if args.routing
                else []
            ),
            *shares(results),
            "",
            *(
                [
                    "The paid fallback's calls by method over each whole run (cold start "
                    "included): "
                    + "; ".join(
                        f"{t.upper()} " + ", ".join(f"`{k}` {v}" for k, v in sorted(c.items()) if k)
                        for t, c in paid_calls.items()
                    ),
                    "",
                ]
                if paid_calls
                else []
            ),
            "Upstream calls on the wire per 1,000 client requests, by method (measured windows):",
            "",
            common.table(
                ["method", *("WS" if t == "ws" else "HTTP" for t in results)], method_rows
            ),
            "",
            f'Every new block makes each "latest" answer stale, so per block this mix has '
            f"about {KEYS_PER_BLOCK} keys that must be fetched once ({len(ACCOUNTS)} accounts, "
            "balance and nonce each, 5 eth_call, the latest block, one log range) plus the "
            "receipts of the block's transactions: a cache that fetches each once per block "
            f"makes ≈ 1000 * ({KEYS_PER_BLOCK} + receipts) / (client calls per block) per "
            "1,000; more users per block lower the ratio, more accounts raise it.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
