"""The client behind trusted proxies: which address of ``X-Forwarded-For`` or ``Forwarded``
(RFC 7239) is the client's.

Each proxy appends the address it was connected from, so only the right end of the list is
written by proxies the node trusts; anything left of the first address that is not a
trusted proxy was written by that client itself, and may be anything. The client is found
by walking from the right and skipping trusted proxies; the first untrusted address is the
client. The walk is bounded (``max_hops``): a head of 32 KiB holds thousands of hops.

Only a peer that is itself a trusted proxy is asked (the transports check that first);
from anyone else these headers mean nothing. Pure functions: no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``trusted_proxies`` as networks (an address alone is its /32 or /128); ValueError
    names an entry that is neither."""
    out: list[Network] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or a network: {entry!r}") from None
    return tuple(out)


def parse_address(text: str) -> Address | None:
    """An address as a header or a socket names it: ``1.2.3.4``, ``1.2.3.4:80``, ``::1``,
    ``[::1]:80``, an IPv4-mapped IPv6 address as its IPv4 address; None for anything else."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]  # IPv4 with a port (Azure's X-Forwarded-For)
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Trusted:
    """The proxies whose headers are believed (``[server] trusted_proxies``)."""

    __slots__ = ("_check", "networks")

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self.networks = networks
        # Per distinct address string, bounded: a proxy's own address is asked on every
        # request; a scan of forged hops cannot grow it past the bound.
        self._check = functools.lru_cache(maxsize=4096)(self._uncached)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def _uncached(self, address: str) -> bool:
        ip = parse_address(address)
        return ip is not None and self.holds(ip)

    def holds(self, ip: Address) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)

    def __contains__(self, address: str) -> bool:
        """Whether ``address`` (as a socket or a header names it) is a trusted proxy."""
        return bool(self.networks) and self._check(address)


def client_from_xff(value: str, trusted: Trusted, max_hops: int) -> str | None:
    """The client's address from ``X-Forwarded-For`` (every line of it joined by commas),
    as sent by a trusted proxy: the right-most hop that is not a trusted proxy. None when
    there is none to take: the header is empty, or its right-most hop is not an address
    (the proxy that sent it is then the client). Every hop trusted, or ``max_hops`` of them
    walked: the last one walked."""
    return _walk(value, trusted, max_hops, _xff_hop)


def client_from_forwarded(value: str, trusted: Trusted, max_hops: int) -> str | None:
    """As ``client_from_xff``, from RFC 7239 ``Forwarded`` elements' ``for=`` parameters
    (quoted or not, IPv6 in brackets, a port after the address). An element without
    ``for=``, or naming ``unknown`` or an obfuscated identifier, ends the walk."""
    return _walk(value, trusted, max_hops, _forwarded_for)


def _xff_hop(hop: str) -> str:
    return hop


def _forwarded_for(element: str) -> str:
    for pair in element.split(";"):
        name, eq, val = pair.partition("=")
        if eq and name.strip().lower() == "for":
            val = val.strip()
            if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
                val = val[1:-1]
            return val
    return ""


def _walk(value: str, trusted: Trusted, max_hops: int, read: Callable[[str], str]) -> str | None:
    if max_hops <= 0:
        return None
    # Only the hops walked are split off: the rest of a huge chain stays one string.
    hops = value.rsplit(",", max_hops)[-max_hops:]
    last: str | None = None
    for hop in reversed(hops):
        ip = parse_address(read(hop))
        if ip is None:
            return last  # not an address: what the last trusted proxy said is all there is
        address = str(ip)
        if not trusted.holds(ip):
            return address
        last = address
    return last
