"""The client address of the request being served, for limits kept per address.

The request pipeline does not know its transport; a limit per client address (filters per
IP) still needs the address. Transports set it only where a request becomes a task (a
call that needs more than a cache hit), and the task keeps it: asyncio copies the context
into every task it creates. A synchronous answer never reads it, so the cache-hit paths
never pay for setting it.
"""

from __future__ import annotations

import contextvars

_PEER: contextvars.ContextVar[str] = contextvars.ContextVar("chainrelay_peer", default="")


def current_peer() -> str:
    """The client address of the request being served; "" when unknown (the node's own
    calls, or a transport that does not say)."""
    return _PEER.get()


def enter_peer(ip: str) -> contextvars.Token[str]:
    """Make ``ip`` the current client address until ``leave_peer``; call right around the
    creation of a request's task, which keeps it."""
    return _PEER.set(ip)


def leave_peer(token: contextvars.Token[str]) -> None:
    _PEER.reset(token)
