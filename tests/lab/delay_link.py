"""A TCP forwarder that holds every chunk for a fixed one-way delay: a slow link between regions.

The kernel the lab runs on has no ``netem`` qdisc (nor fq, etf or cake), so link delay cannot
be set on the lab's veth interfaces; the lab delays in user space instead. Each accepted
connection gets its own connection to ``--to``; the bytes read from either side are held for
``--delay-ms`` and then written to the other side, in the order they were read. TCP handshakes
are not delayed (the outgoing connection opens at once); data, including the end of a stream
(a half-close), is. A round trip through the link therefore costs at least twice the delay.

Run as a process of its own, inside the region the traffic leaves from::

    ip netns exec REGION python -m tests.lab.delay_link \\
        --listen 127.0.0.1:0 --to 10.213.0.2:8545 --delay-ms 40

It prints ``ready <port>`` on stdout once it listens, stops on SIGTERM and exits by itself
after ``--max-seconds``. With ``--netns NAME`` it listens in the namespace it was started in
and opens its outgoing connections inside namespace NAME (a socket keeps the namespace it was
created in): that is how a test process in the root namespace reaches a node in a region
without any interface or address added to the root namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import os
import signal
import socket
import sys

# Bytes held per direction before the link stops reading that side: 4 MiB is the
# bandwidth-delay product of about 400 Mbit/s at 75 ms one way, more than a lab needs, and
# bounds what one connection can pin.
MAX_HELD_BYTES = 4 * 1024 * 1024
# One read per chunk: 64 KiB matches the socket buffers so a fast sender is drained in few reads.
READ_CHUNK = 64 * 1024
# A destination that does not accept within this many seconds is down; the client is closed.
CONNECT_TIMEOUT = 10.0
# A link never outlives the longest lab test by much, even if no one stops it.
DEFAULT_MAX_SECONDS = 600.0

CLONE_NEWNET = 0x40000000


class Direction:
    """One way through the link: reads one side, holds each chunk ``delay`` seconds, writes."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.delay = delay
        # (due time, chunk); an empty chunk is the end of the stream.
        self.held: collections.deque[tuple[float, bytes]] = collections.deque()
        self.held_bytes = 0
        self.arrived = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def take_in(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self.reader.read(READ_CHUNK)
            self.held.append((loop.time() + self.delay, data))
            self.held_bytes += len(data)
            self.arrived.set()
            if not data:
                return
            if self.held_bytes >= MAX_HELD_BYTES:
                self.room.clear()
                await self.room.wait()

    async def give_out(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.held:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            wait = self.held[0][0] - loop.time()
            if wait > 0:
                # Checked again after the sleep: a timer may fire a little early, and a chunk
                # must never leave before it is due.
                await asyncio.sleep(wait)
                continue
            # Everything already due leaves in one write, so a backlog drains at wire speed.
            out: list[bytes] = []
            now = loop.time()
            eof = False
            while self.held and self.held[0][0] <= now:
                _, data = self.held.popleft()
                if not data:
                    eof = True
                    break
                out.append(data)
            if out:
                sent = sum(map(len, out))
                self.writer.write(b"".join(out))
                await self.writer.drain()
                self.held_bytes -= sent
                if self.held_bytes < MAX_HELD_BYTES:
                    self.room.set()
            if eof:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return


async def carry(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    host: str,
    port: int,
    delay: float,
) -> None:
    """Serve one accepted connection until both directions have ended or one side failed."""
    try:
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    except (OSError, TimeoutError):
        client_w.transport.abort()
        return
    ways = (Direction(client_r, up_w, delay), Direction(up_r, client_w, delay))
    tasks = [asyncio.create_task(c) for w in ways for c in (w.take_in(), w.give_out())]
    failed = False
    try:
        await asyncio.gather(*tasks)
    except OSError:
        # A reset on one side is passed on as a reset on the other.
        failed = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (client_w, up_w):
            if failed:
                w.transport.abort()
            else:
                w.close()


def enter_netns(name: str) -> None:
    """Make sockets created from now on belong to network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


async def serve(listener: socket.socket, host: str, port: int, delay: float, limit: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Connections still open when the link stops are cut; that is the stop, not an error.
        with contextlib.suppress(asyncio.CancelledError):
            await carry(r, w, host, port, delay)

    server = await asyncio.start_server(accept, sock=listener)
    print(f"ready {listener.getsockname()[1]}", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), limit)
    server.close()


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="delay_link", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on")
    ap.add_argument("--to", required=True, help="HOST:PORT every connection is carried to")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each way")
    ap.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    ap.add_argument("--netns", help="open outgoing connections inside this network namespace")
    args = ap.parse_args(argv)
    if args.delay_ms < 0 or args.max_seconds <= 0:
        ap.error("--delay-ms must be >= 0 and --max-seconds > 0")
    listen_host, listen_port = split_hostport(args.listen)
    to_host, to_port = split_hostport(args.to)
    # Bound before entering the other namespace: the listener stays where the link started.
    listener = socket.create_server((listen_host, listen_port))
    if args.netns:
        enter_netns(args.netns)
    asyncio.run(serve(listener, to_host, to_port, args.delay_ms / 1000, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
