"""Fan-out to many ``eth_subscribe("newHeads")`` subscribers of one relay node.

One relay follows anvil over WebSocket; ``--subscribers`` WebSocket clients (5,000) each
hold one newHeads subscription on it, and one more subscriber listens to anvil directly.
anvil mines a block with one transfer every ``--interval`` seconds, ``--blocks`` times.
For every block the script records when anvil's own subscriber got it and when the first
and the last relay subscriber did (one monotonic clock, one client process), and gives:

* **first - anvil**: the head reaching the node and the node adopting it (newHeads go out
  as the head is adopted; the block and its receipts are fetched after);
* **last - first**: the fan-out itself: the node's pass over every subscriber, the kernel,
  and this client reading 5,000 messages (its own CPU per block is printed next to it);
* **last - anvil**: what the slowest subscriber sees.

Memory per idle subscriber: the relay's RSS after a warm-up batch of subscribers and a few
blocks (one-time costs paid), and again once every other subscriber is subscribed and
idle; the difference divided by their number.

The clients are raw asyncio protocols (a WebSocket handshake, masked text frames out,
frame headers parsed in; a read holding one whole notification, nearly every read, is
scanned in place for the block number), so the client costs a few microseconds per
message; its user and system CPU per block are printed, and the sum of its CPU and the
relay's, over the CPUs they share, is a floor under the last subscriber's time. The file
descriptor limit is raised here for both processes.

    python benchmarks/subscribers.py [--subscribers 5000] [--blocks 35] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
import uvloop

from chainrelay.devnet import DEV_ACCOUNTS

GOAL_LAST_P99_MS = 50.0
GOAL_KB_PER_SUBSCRIBER = 30.0
# Subscribers connected before the memory baseline, so one-time costs (the feed starting,
# first buffers, imports) are not charged to the idle ones.
WARMUP_SUBSCRIBERS = 200
WARMUP_BLOCKS = 3
# Connections opened at once: stays well inside the listen backlog.
CONNECT_CONCURRENCY = 100
# A block not received by every subscriber within this long counts as missed by the rest.
BLOCK_TIMEOUT = 5.0
BUDGET_SECONDS = 300
_KEY = base64.b64encode(os.urandom(16)).decode()
_NUMBER = b'"number":"0x'
_SUBSCRIBE = b'{"jsonrpc":"2.0","id":1,"method":"eth_subscribe","params":["newHeads"]}'


def masked_text_frame(payload: bytes) -> bytes:
    """A client text frame; the zero mask leaves the payload as it is (any key is valid)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    else:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + payload


@dataclass
class BlockTimes:
    first: float = float("inf")
    last: float = 0.0
    count: int = 0


@dataclass
class Receipts:
    """Receive times by block number: direct (anvil) and relay subscribers."""

    relay: dict[int, BlockTimes] = field(default_factory=dict)
    direct: dict[int, float] = field(default_factory=dict)
    subscribed: int = 0
    errors: list[str] = field(default_factory=list)

    def got(self, number: int, direct: bool, now: float) -> None:
        if direct:
            self.direct.setdefault(number, now)
            return
        t = self.relay.get(number)
        if t is None:
            t = self.relay[number] = BlockTimes()
        t.count += 1
        if now < t.first:
            t.first = now
        if now > t.last:
            t.last = now


class Subscriber(asyncio.Protocol):
    """One WebSocket connection holding one newHeads subscription."""

    def __init__(self, host: str, port: int, receipts: Receipts, direct: bool) -> None:
        self.request = (
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.receipts = receipts
        self.direct = direct
        self.buf = bytearray()
        self.upgraded = False
        self.subscribed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        if not buf and self.upgraded and len(data) > 4 and data[0] == 0x81:
            # Nearly every read: one whole notification. Its frame length is checked and
            # its number read in place, with no copy.
            n, at = data[1], 2
            if n == 126:
                n, at = (data[2] << 8) | data[3], 4
            if n < 127 and at + n == len(data):
                self._message(data, now, at)
                return
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._fail(f"upgrade refused: {bytes(buf[:80])!r}")
                return
            del buf[: end + 4]
            self.upgraded = True
            assert self.transport is not None
            self.transport.write(masked_text_frame(_SUBSCRIBE))
        while len(buf) >= 2:
            opcode, n, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + n:
                return
            payload = bytes(buf[at : at + n])
            del buf[: at + n]
            if opcode == 0x1:
                self._message(payload, now, 0)
            elif opcode == 0x9 and self.transport is not None:  # ping: answer, or be closed
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            elif opcode == 0x8:
                self._fail(f"closed by the server: {payload[2:]!r}")

    def _message(self, payload: bytes, now: float, start: int) -> None:
        at = payload.find(_NUMBER, start)
        if at >= 0:
            at += len(_NUMBER)
            self.receipts.got(int(payload[at : payload.index(b'"', at)], 16), self.direct, now)
        elif not self.subscribed.done():
            if b'"result":"0x' in payload:
                self.subscribed.set_result(None)
            else:
                self._fail(f"subscribe refused: {payload[:200]!r}")

    def _fail(self, why: str) -> None:
        self.receipts.errors.append(why)
        if not self.subscribed.done():
            self.subscribed.set_exception(RuntimeError(why))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(RuntimeError(f"connection lost: {exc}"))


async def subscribe(
    port: int, receipts: Receipts, count: int, direct: bool = False
) -> list[asyncio.Transport]:
    """``count`` subscribed connections to 127.0.0.1:``port``."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    transports: list[asyncio.Transport] = []

    async def one() -> None:
        async with gate:
            transport, proto = await loop.create_connection(
                lambda: Subscriber("127.0.0.1", port, receipts, direct), "127.0.0.1", port
            )
            transports.append(transport)
            async with asyncio.timeout(20):
                await proto.subscribed
            receipts.subscribed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return transports


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, need))
    if want < need:
        raise SystemExit(f"need {need} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the relay inherits it


@dataclass
class Result:
    first_ms: list[float]
    spread_ms: list[float]
    last_ms: list[float]
    missed: int
    missed_blocks: list[int]
    blocks: int
    client_user_ms: float
    client_sys_ms: float
    relay_user_ms: float
    relay_sys_ms: float
    kib_per_subscriber: float
    rss_before_mib: float
    rss_after_mib: float


async def run(args: argparse.Namespace, anvil_ws_port: int, relay: common.Relay) -> Result:
    assert relay.proc is not None
    pid = relay.proc.pid
    receipts = Receipts()
    miner = common.RpcClient(f"http://127.0.0.1:{anvil_ws_port}")
    conns: list[asyncio.Transport] = []
    n = 0

    async def mine() -> int:
        nonlocal n
        n += 1
        tx = {"from": DEV_ACCOUNTS[0], "to": DEV_ACCOUNTS[1], "value": hex(n)}
        await asyncio.to_thread(miner.call, "eth_sendTransaction", [tx])  # automine: a block
        return int(await asyncio.to_thread(miner.call, "eth_blockNumber", []), 16)

    async def all_got(number: int, want: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = receipts.relay.get(number)
            if t is not None and t.count >= want and number in receipts.direct:
                return True
            await asyncio.sleep(0.005)
        return False

    try:
        conns += await subscribe(anvil_ws_port, receipts, 1, direct=True)
        conns += await subscribe(relay.port, receipts, WARMUP_SUBSCRIBERS)
        for _ in range(WARMUP_BLOCKS):
            await all_got(await mine(), WARMUP_SUBSCRIBERS, BLOCK_TIMEOUT)
        await asyncio.sleep(0.5)  # let the relay's buffers drain before the baseline
        before = rss_kib(pid)
        rest = args.subscribers - WARMUP_SUBSCRIBERS
        conns += await subscribe(relay.port, receipts, rest)
        await asyncio.sleep(1.0)  # idle: nothing is sent to subscribers between blocks
        after = rss_kib(pid)
        if receipts.errors:
            raise RuntimeError(f"{len(receipts.errors)} subscriber errors: {receipts.errors[:3]}")

        numbers: list[int] = []
        cpu0, rcpu0 = os.times(), common.cpu_times(pid)
        for _ in range(args.blocks):
            started = time.monotonic()
            number = await mine()
            numbers.append(number)
            await all_got(number, args.subscribers, BLOCK_TIMEOUT)
            await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - started)))
        cpu1 = os.times()
        client_user, client_sys = cpu1.user - cpu0.user, cpu1.system - cpu0.system
        rcpu1 = common.cpu_times(pid)
        relay_user, relay_sys = rcpu1[0] - rcpu0[0], rcpu1[1] - rcpu0[1]
    finally:
        for t in conns:
            t.close()
        miner.close()

    first, spread, last = [], [], []
    missed = 0
    missed_blocks: list[int] = []
    for number in numbers:
        t = receipts.relay.get(number)
        d = receipts.direct.get(number)
        if t is None or d is None:
            missed += args.subscribers
            missed_blocks.append(number)
            continue
        if t.count < args.subscribers:
            missed += args.subscribers - t.count
            missed_blocks.append(number)
        first.append((t.first - d) * 1000)
        spread.append((t.last - t.first) * 1000)
        last.append((t.last - d) * 1000)
    return Result(
        first,
        spread,
        last,
        missed,
        missed_blocks,
        len(numbers),
        client_user / len(numbers) * 1000,
        client_sys / len(numbers) * 1000,
        relay_user / len(numbers) * 1000,
        relay_sys / len(numbers) * 1000,
        (after - before) / rest,
        before / 1024,
        after / 1024,
    )


def ms(values: list[float], q: float) -> str:
    return f"{common.quantile(values, q):.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", type=int, default=5000)
    ap.add_argument("--blocks", type=int, default=35)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between blocks")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    if args.subscribers <= WARMUP_SUBSCRIBERS:
        ap.error(f"--subscribers must be above the {WARMUP_SUBSCRIBERS} warm-up subscribers")
    common.budget(BUDGET_SECONDS)
    raise_fd_limit(args.subscribers + 1000)
    m = common.machine()
    toml = (
        f"[limits]\nmax_connections_per_ip = {args.subscribers + 100}\n\n"
        f"[subscriptions]\nmax_per_ip = {args.subscribers + 100}\n"
    )
    with contextlib.ExitStack() as stack:
        anvil = common.start_anvil(block_time=None)
        stack.callback(anvil.stop)
        poker = common.RpcClient(anvil.url)
        stack.callback(poker.close)
        relay = common.Relay(anvil.ws_url, toml)
        stack.callback(relay.stop)
        relay.start(poke=lambda: poker.call("evm_mine", []))
        port = int(anvil.url.rsplit(":", 1)[1])
        res = uvloop.run(run(args, port, relay))

    rows = [
        [
            "first relay subscriber - anvil's subscriber",
            ms(res.first_ms, 0.5),
            ms(res.first_ms, 0.99),
        ],
        [
            "last - first relay subscriber (fan-out)",
            ms(res.spread_ms, 0.5),
            ms(res.spread_ms, 0.99),
        ],
        ["last relay subscriber - anvil's subscriber", ms(res.last_ms, 0.5), ms(res.last_ms, 0.99)],
    ]
    lat = common.table(["per block, ms", "p50", "p99"], rows)
    mem = common.table(
        [
            "relay RSS, warm-up subscribers",
            f"RSS with {args.subscribers} subscribers",
            "per idle subscriber",
        ],
        [
            [
                f"{res.rss_before_mib:.1f} MiB",
                f"{res.rss_after_mib:.1f} MiB",
                f"{res.kib_per_subscriber:.1f} KiB",
            ]
        ],
    )
    p99_last = common.quantile(res.last_ms, 0.99)
    work = res.relay_user_ms + res.relay_sys_ms + res.client_user_ms + res.client_sys_ms
    cpus = int(m["nproc"])
    missed_in = f" (in blocks {res.missed_blocks})" if res.missed_blocks else ""
    verdict = (
        f"Goals: last subscriber within {GOAL_LAST_P99_MS:.0f} ms of the head at p99 (last "
        f"relay subscriber - anvil's subscriber: {p99_last:.1f} ms, "
        f"{'met' if p99_last <= GOAL_LAST_P99_MS else 'NOT met'}); "
        f"≤ {GOAL_KB_PER_SUBSCRIBER:.0f} KB per idle subscriber "
        f"({res.kib_per_subscriber:.1f} KiB, "
        f"{'met' if res.kib_per_subscriber * 1.024 <= GOAL_KB_PER_SUBSCRIBER else 'NOT met'})."
    )
    notes = (
        f"{res.blocks} blocks, one every {args.interval:.1f} s; notifications missed: "
        f"{res.missed}{missed_in}. Relay CPU per block: {res.relay_user_ms:.1f} ms user + "
        f"{res.relay_sys_ms:.1f} ms system (one socket write per subscriber; on loopback the "
        f"sender's write also runs the receiver's TCP input). This client: "
        f"{res.client_user_ms:.1f} ms user + {res.client_sys_ms:.1f} ms system per block to "
        f"read {args.subscribers} messages (one read per message), on the same CPUs, and "
        "part of every 'last' number since it reads them one after another. Together "
        f"{work:.0f} ms of CPU per block on {cpus} CPUs: the last subscriber cannot be "
        f"served in less than about {work / cpus:.0f} ms here, however the work is spread."
    )
    body = "\n\n".join(
        [
            "## `subscribers.py`",
            f"{args.subscribers} WebSocket `newHeads` subscribers on one relay process in "
            "front of anvil (followed over WebSocket). Times per block from one monotonic "
            "clock in one client process; anvil's own subscriber marks the head's arrival.",
            common.machine_line(m),
            lat,
            mem,
            notes,
            verdict,
        ]
    )
    print(body)
    if not args.no_write:
        common.write_section("subscribers", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
