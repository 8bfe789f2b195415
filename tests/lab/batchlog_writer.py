"""Append batches to a durable batch log and print each seq once its future resolves.

Run as a process of its own (a test SIGKILLs it at a random moment)::

    python -m tests.lab.batchlog_writer PATH --count 10000

Every line printed (``seq\\n``, flushed) is an acknowledgement: the batch is committed.
The batches' bytes follow from their seq (``batch(seq)``), so a reader can check each one.
Prints ``done`` after the last, once the log is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import random
import sys

from chainrelay.batches.log import BatchLog
from chainrelay.config import BatchesConfig

STREAM = "arbitrum/batches"
# Batches in flight at once, as a pipelining sequencer keeps them.
WINDOW = 1000


def batch(seq: int) -> tuple[bytes, bytes]:
    """(hash, frame) of batch ``seq``: 2 KB most, every 50th 100 KB."""
    size = 100_000 if seq % 50 == 0 else 2048
    frame = random.Random(seq).randbytes(size)
    return hashlib.blake2b(frame, digest_size=32).digest(), frame


async def run(path: str, count: int) -> None:
    log = BatchLog(BatchesConfig(log=path))
    await log.start()
    window = asyncio.Semaphore(WINDOW)
    out = sys.stdout

    def acked(fut: asyncio.Future[None], seq: int) -> None:
        window.release()
        if fut.exception() is None:
            out.write(f"{seq}\n")
            out.flush()

    last = None
    for seq in range(1, count + 1):
        await window.acquire()
        last = log.append(STREAM, seq, *batch(seq))
        last.add_done_callback(functools.partial(acked, seq=seq))
    if last is not None:
        await asyncio.wait([last])
    await log.stop()
    out.write("done\n")
    out.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(run(args.path, args.count))


if __name__ == "__main__":
    main()
