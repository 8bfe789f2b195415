"""Long work on the event loop in slices: a block's intake never holds the loop for long.

A block of a busy chain is ~1 MB of JSON with its transactions and ~2 MB of receipts, a
second; decoded, split, cached and held in one go it held the loop for 5 to 13 ms at a time,
several times a block, and a client's request arriving then waited as long. Here that work
runs ``LOOP_SLICE_SECONDS`` at a time: ``Slicer.pause`` lets the loop run once a slice is
used up (one clock read otherwise), and ``drive`` runs a sans-I/O generator that yields
between pieces of its work (``wire.pieces``, ``chain.logstore``) the same way.

A small answer is decoded in one call, as before: below ``LARGE_ANSWER_BYTES`` the
piecewise decoder would cost more than the stall it saves.

What a block was decoded into is freed the same way (``let_go``): dropped at once, its
~100,000 objects took 3 to 13 ms to free, on the loop.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Generator
from typing import Any, TypeVar

import orjson

from chainrelay import defaults
from chainrelay.wire.jsonrpc import Answer, parse_answer
from chainrelay.wire.pieces import answer_steps, result_steps

T = TypeVar("T")


class Slicer:
    """The clock of one piece of long work: ``pause`` at every convenient point."""

    __slots__ = ("budget", "until")

    def __init__(self, budget: float = defaults.LOOP_SLICE_SECONDS) -> None:
        self.budget = budget
        self.until = time.perf_counter() + budget

    async def pause(self) -> None:
        """Let the event loop run if this slice is used up."""
        if time.perf_counter() >= self.until:
            await asyncio.sleep(0)
            self.until = time.perf_counter() + self.budget


async def drive(steps: Generator[None, None, T], slicer: Slicer | None = None) -> T:
    """Run ``steps`` to its end, letting the loop run between them once a slice is used."""
    clock = slicer if slicer is not None else Slicer()
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
        await clock.pause()


async def let_go(lists: list[list[Any]], slicer: Slicer | None = None) -> None:
    """Free large decoded lists (a block's transactions, receipts, logs) a slice at a
    time, ``LET_GO_STEP`` items between two looks at the clock; ``lists`` is emptied. A
    list something else still holds is left as it is: whoever drops it last frees it."""
    clock = slicer if slicer is not None else Slicer()
    while lists:
        items = lists.pop()
        # Held by this frame's name alone (and getrefcount's own argument).
        if sys.getrefcount(items) == 2:
            while items:
                del items[-defaults.LET_GO_STEP :]
                await clock.pause()
        del items


async def parse_large_answer(raw: bytes, slicer: Slicer | None = None) -> Answer:
    """``parse_answer`` of an upstream's answer: piecewise when it is large and has a
    result (the decoded answer then carries its parts, ``Answer.parts``); any other answer,
    or one the piecewise decoder does not take, is read by ``parse_answer`` as always."""
    if len(raw) > defaults.LARGE_ANSWER_BYTES:
        try:
            got = await drive(answer_steps(raw, defaults.DECODE_STEP_CHARS), slicer)
        except ValueError:
            pass
        else:
            return Answer(got.result, None, got.value, got.parts)
    return parse_answer(raw)


async def decode_result(result: bytes, slicer: Slicer | None = None) -> Answer:
    """An answer holding ``result`` (raw JSON) and its decoding: piecewise when large,
    ``orjson.loads`` otherwise or when the piecewise decoder does not take it. Raises
    ``orjson.JSONDecodeError`` for bytes that are not JSON."""
    if len(result) > defaults.LARGE_ANSWER_BYTES:
        try:
            value, parts = await drive(result_steps(result, defaults.DECODE_STEP_CHARS), slicer)
        except ValueError:
            pass
        else:
            return Answer(result, None, value, parts)
    return Answer(result, None, orjson.loads(result))
