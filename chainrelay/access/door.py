"""Who a request is, from what the transport read: the connection's address, the proxies
in front of the node (``forwarded.py``) and the API key it presents (``keys.py``).

The transports (server/http.py, ws upgrades) compute a connection's identity from its
address once, and ask the ``Door`` per request only when a request can say more: when the
connection comes from a trusted proxy (one connection of a proxy carries many clients, so
the client is per request) or when keys are in use. With neither, nothing here runs.

A request that presents a key the node does not hold is refused (401), whether keys are
required or not: a client with a mistyped key is told, not served as anonymous. The answer
is the same for a missing key (when required) as for a wrong one. A key used from a
browser origin it does not list is refused with 403. Pure: no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from chainrelay.access.forwarded import Trusted, client_from_forwarded, client_from_xff
from chainrelay.access.identity import Identity, for_address
from chainrelay.access.keys import KeyRing, presented


class Refusal(enum.Enum):
    """Why a request is not served, with its HTTP status."""

    UNAUTHORIZED = 401  # no valid key (required), or a key the node does not hold
    ORIGIN = 403  # a key used from a browser origin it does not allow


# JSON-RPC error -32001 (unauthorized; as Infura and Alchemy answer) in each refusal's body:
# the same body for a missing key as for a wrong one.
REFUSAL_BODIES = {
    Refusal.UNAUTHORIZED: (
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-32001,'
        b'"message":"unauthorized: a valid API key is required"}}'
    ),
    Refusal.ORIGIN: (
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-32001,'
        b'"message":"forbidden: this API key may not be used from this origin"}}'
    ),
}

# A header of the request being read, by lower-case name (all its lines joined); None.
Headers = Callable[[bytes], bytes | None]


class Door:
    """The node's rules for naming a request's client."""

    __slots__ = ("header", "ipv6_prefix", "keys", "keys_on", "max_hops", "required", "trusted")

    def __init__(
        self,
        trusted: Trusted,
        *,
        header: str = "x-forwarded-for",
        max_hops: int = 16,
        ipv6_prefix: int = 64,
        keys: KeyRing | None = None,
        required: bool = False,
    ) -> None:
        self.trusted = trusted
        self.header = header.encode()
        self.max_hops = max_hops
        self.ipv6_prefix = ipv6_prefix
        self.keys = keys if keys is not None else KeyRing()
        self.required = required
        # Whether every request is asked for a key (else only proxied ones are asked for
        # their client's address).
        self.keys_on = keys is not None or required

    def client(self, conn: Identity, headers: Headers) -> Identity:
        """The client of a request that came from a trusted proxy (``conn``: the proxy's
        identity): the address its forwarding header names; the proxy's when it names
        none."""
        value = headers(self.header)
        if value is None:
            return conn
        text = value.decode("latin-1")
        if self.header == b"forwarded":
            address = client_from_forwarded(text, self.trusted, self.max_hops)
        else:
            address = client_from_xff(text, self.trusted, self.max_hops)
        return conn if address is None else for_address(address, self.ipv6_prefix)

    def admit(
        self, conn: Identity, proxied: bool, headers: Headers, target: bytes
    ) -> Identity | Refusal:
        """The identity of a request (``target``: its request target, for a key in the
        path), or why it is refused."""
        who = self.client(conn, headers) if proxied else conn
        if not self.keys_on:
            return who
        key = presented(headers(b"authorization"), headers(b"x-api-key"), target)
        if key is None:
            return Refusal.UNAUTHORIZED if self.required else who
        owner = self.keys.find(key)
        if owner is None:
            return Refusal.UNAUTHORIZED
        if owner.origins is not None:
            origin = headers(b"origin")
            if origin is not None and origin.strip() not in owner.origins:
                return Refusal.ORIGIN
        return owner.identity
