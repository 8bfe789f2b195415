"""The relays a request already passed through (loop detection), and tasks of the node's
own that carry no request's context.

The request pipeline does not know its transport; the Via a request came with is set where
a request becomes a task, and the task keeps it: asyncio copies the context into every
task it creates. (Who the client is travels the same way: chainrelay/access/identity.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import secrets
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# The Via header (RFC 9110 7.6.3) of the request being served, as it came: the relays it
# passed through. Upstream requests made for it carry it on, with this node added.
_VIA: contextvars.ContextVar[str] = contextvars.ContextVar("chainrelay_via", default="")
# One relay's entry: what a chainrelay node writes, and all it carries on.
_VIA_ENTRY = re.compile(rb"1\.1 (chainrelay-[0-9a-f]{8})")


def new_via_name() -> str:
    """A node's name in Via headers: random, so two nodes never share one; made once per
    node (its worker processes share it)."""
    return f"chainrelay-{secrets.token_hex(4)}"


def relays_in(via: bytes) -> list[bytes]:
    """The chainrelay nodes a request passed through, from its Via header(s): anything
    else a client or a proxy wrote there is dropped, so none of it is carried on."""
    return _VIA_ENTRY.findall(via)


def current_via() -> str:
    return _VIA.get()


def enter_via(via: str) -> contextvars.Token[str]:
    return _VIA.set(via)


def leave_via(token: contextvars.Token[str]) -> None:
    _VIA.reset(token)


def detached(coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """A task of the node's own, started from wherever: it runs in an empty context, so a
    request that happened to start it (a miss that made the block follower follow, an error
    that sent an upstream to probation) lends it neither its client address nor its Via,
    which would otherwise mark every later call of the task."""
    return asyncio.get_running_loop().create_task(coro, name=name, context=contextvars.Context())


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a service's own task (None: none running) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
