"""Who a call is charged to: the identity every per-client limit is kept under.

An identity is the key a client authenticated with when it has one, else its address;
an IPv6 address stands for its whole network prefix (``ipv6_prefix``, /64 by default),
since one subscriber is usually handed a /64 and could otherwise take a fresh address
for every connection. Every limit per client (connections, memory buffered, upstream
calls in flight, subscriptions, filters) is counted under ``Identity.name``.

The transports find a request's identity (HttpServer, WsSession) and hand it to the
request pipeline with each body. A task made for a request keeps it in a context variable,
so code a few calls away from the transport (the filter table, the upstream gate) reads
it without threading it through every signature; a synchronous answer never sets it.
"""

from __future__ import annotations

import contextvars
import functools
import ipaddress
from dataclasses import dataclass

from chainrelay.defaults import DEFAULT_TIER


@dataclass(frozen=True, slots=True)
class Identity:
    """A client as the node's limits see it."""

    # What limits are kept under: the address ("203.0.113.7"), an IPv6 network
    # ("2001:db8:1:2::/64"), or "key:<name>" for a client with a key; "" for the node's own
    # calls.
    name: str
    tier: str = DEFAULT_TIER
    key: str | None = None  # the key's name, when the client authenticated with one
    # A key's own allow list of methods, narrower than its tier's (None: the tier's).
    methods: frozenset[str] | None = None


# The node's own calls (the block follower, probes): no client's limits apply.
NODE = Identity("")


@functools.lru_cache(maxsize=65_536)
def for_address(address: str, ipv6_prefix: int = 64) -> Identity:
    """The identity of a client known only by its address (made once per address: the
    cache's bound keeps an address scan from growing it without end)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return Identity(address)  # not an IP address (a Unix socket's path): as it is
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return Identity(str(mapped))
        if ipv6_prefix < 128:
            net = ipaddress.IPv6Network((ip, ipv6_prefix), strict=False)
            return Identity(str(net))
    return Identity(str(ip))


_CURRENT: contextvars.ContextVar[Identity] = contextvars.ContextVar(
    "chainrelay_identity", default=NODE
)


def current_identity() -> Identity:
    """The identity of the request being served; ``NODE`` for the node's own calls."""
    return _CURRENT.get()


def enter_identity(who: Identity) -> contextvars.Token[Identity]:
    """Make ``who`` the current identity until ``leave_identity``; call right around the
    creation of a request's task, which keeps it."""
    return _CURRENT.set(who)


def leave_identity(token: contextvars.Token[Identity]) -> None:
    _CURRENT.reset(token)
