"""Coalescing: N concurrent identical calls cost one upstream call."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Runs one call per key at a time; every concurrent caller awaits the same result.

    The call runs in a task of its own, so a caller that goes away (a client disconnect)
    cancels only its own wait, never the call the others are waiting on.
    """

    def __init__(self) -> None:
        self._inflight: dict[bytes, asyncio.Future[T]] = {}
        self.joined = 0  # callers that rode on another's call

    def __len__(self) -> int:
        return len(self._inflight)

    def __contains__(self, key: bytes) -> bool:
        task = self._inflight.get(key)
        return task is not None and not task.done()

    async def run(self, key: bytes, factory: Callable[[], Awaitable[T]]) -> T:
        return await asyncio.shield(self.start(key, factory))

    def start(self, key: bytes, factory: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """The call under way for ``key``, started from ``factory`` if there is none: for a
        caller that lets others join a call it may not wait for itself."""
        task = self._inflight.get(key)
        # A finished call stays listed until its done-callback runs, one loop iteration
        # later: joining it then would hand out an outcome decided before this caller came.
        if task is None or task.done():
            task = asyncio.ensure_future(factory())
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        else:
            self.joined += 1
        return task

    def task(self, key: bytes) -> asyncio.Future[T] | None:
        """The call under way for ``key``, if any (not joined: the caller only watches it)."""
        task = self._inflight.get(key)
        return task if task is not None and not task.done() else None

    def promise(self, key: bytes) -> asyncio.Future[T]:
        """A call for ``key`` that the caller runs itself and settles through the future
        returned (a call of an upstream batch): others join it as they join a task. There
        must be no call under way for ``key``."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        fut.add_done_callback(functools.partial(self._done, key))
        return fut

    def _done(self, key: bytes, task: asyncio.Future[T]) -> None:
        if self._inflight.get(key) is not task:
            return  # a newer call for the key, started once this one was done
        del self._inflight[key]
