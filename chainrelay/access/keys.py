"""API keys: which key a request presents, and whose it is.

A key comes in ``Authorization: Bearer <key>``, in ``X-Api-Key: <key>``, or in the URL's
path, for clients that take only a URL (op-node, erigon, wallets, ``cast --rpc-url``):
``/k/<key>``, or ``/<key>`` when the one path segment has a key's shape (16 or more
URL-safe characters, so ``/rpc`` or ``/v1`` are never read as keys). A request that names
two different keys presents a wrong one.

Keys are found by the SHA-256 digest of what was presented, then compared in constant time
(``hmac.compare_digest``): the ring holds no raw key, and no comparison of raw keys is
ever made whose time depends on how much of a guess was right. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

from chainrelay.access.identity import Identity
from chainrelay.defaults import MIN_CLIENT_KEY_CHARS

# What a key in a URL's path may be (config refuses any other key: sections.CLIENT_KEY).
_PATH_KEY = re.compile(rb"[A-Za-z0-9._~-]{%d,256}" % MIN_CLIENT_KEY_CHARS)
_BEARER = b"bearer "


@dataclass(frozen=True, slots=True)
class ClientKey:
    """One key's owner: the identity its calls are charged to (``key:<name>``), and the
    browser origins it may be used from (None: any)."""

    name: str
    identity: Identity
    origins: frozenset[bytes] | None = None


def client_key(
    name: str, tier: str, methods: Iterable[str] = (), origins: Iterable[str] = ()
) -> ClientKey:
    """A key's owner as config names it (empty ``methods``: its tier's; empty ``origins``:
    any)."""
    allowed = frozenset(methods) or None
    who = Identity(f"key:{name}", tier, name, allowed)
    return ClientKey(name, who, frozenset(o.encode() for o in origins) or None)


class KeyRing:
    """Keys by the digest of their secret."""

    __slots__ = ("_by_digest",)

    def __init__(self, keys: Iterable[tuple[str, ClientKey]] = ()) -> None:
        self._by_digest: dict[bytes, tuple[bytes, ClientKey]] = {}
        for secret, owner in keys:
            digest = hashlib.sha256(secret.encode()).digest()
            self._by_digest[digest] = (digest, owner)

    def __len__(self) -> int:
        return len(self._by_digest)

    def names(self) -> frozenset[str]:
        return frozenset(owner.name for _, owner in self._by_digest.values())

    def find(self, presented: bytes) -> ClientKey | None:
        """The owner of the key ``presented``; None for a key the ring does not hold."""
        digest = hashlib.sha256(presented).digest()
        hit = self._by_digest.get(digest)
        if hit is None or not hmac.compare_digest(hit[0], digest):
            return None
        return hit[1]


def path_key(target: bytes) -> bytes | None:
    """The key in a request target's path (``/k/<key>``, or ``/<key>``), if it has one.
    ``/k/`` followed by anything else is a key all the same: a wrong one."""
    path = target.split(b"?", 1)[0].rstrip(b"/")
    if path.startswith(b"/k/"):
        return path[3:]
    if path[:1] == b"/" and _PATH_KEY.fullmatch(path, 1) is not None:
        return path[1:]
    return None


def presented(authorization: bytes | None, api_key: bytes | None, target: bytes) -> bytes | None:
    """The key a request presents; None for none; b"" for a request that presents two
    different ones (or an empty one), found by no ring."""
    found: bytes | None = None
    if authorization is not None and authorization[:7].lower() == _BEARER:
        found = authorization[7:].strip()
    for other in (api_key.strip() if api_key is not None else None, path_key(target)):
        if other is None:
            continue
        if found is not None and other != found:
            return b""
        found = other
    return found
