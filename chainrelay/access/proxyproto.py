"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2): the address
a TCP proxy or balancer (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB's proxy protocol
v2) was connected from, written before the client's first byte.

A listener with ``[server] proxy_protocol`` reads one from the start of every connection.
Anything that is not a whole, well-formed header of a TCP connection is ``ProxyHeaderError``
and the connection is closed: a client whose bytes are read as a header it did not send,
or a header read as a request, would both be worse. Pure functions: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
# The longest v1 line, its CRLF included (proxy-protocol.txt 2.1).
V1_MAX_BYTES = 107
_V2_FIXED = 16  # signature, version and command, family, length
_LOCAL, _PROXY = 0x20, 0x21
# Family and transport byte -> bytes of the address block it needs; the addresses of a
# stream over IPv4 or IPv6 are read, UNSPEC carries none (the connection's own stands).
_TCP4, _TCP6, _UNSPEC = 0x11, 0x21, 0x00
_ADDRESS_BYTES = {_TCP4: 12, _TCP6: 36, _UNSPEC: 0}


class ProxyHeaderError(ValueError):
    """The connection did not begin with a well-formed PROXY header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A header read whole: the client's address (None: a LOCAL connection, the proxy's
    own health check, or an unknown protocol; the connection's own address stands), and the
    header's length, after which the client's bytes begin."""

    source: str | None
    length: int


def parse(data: bytes, max_bytes: int = 1024) -> ProxyHeader | None:
    """The header at the start of ``data``; None while it may still be one not yet whole.
    ``max_bytes`` bounds a v2 header (its length field allows 64 KiB)."""
    if data[:12] == V2_SIGNATURE:
        return _v2(data, max_bytes)
    if data[:6] == V1_PREFIX:
        return _v1(data)
    if V2_SIGNATURE.startswith(data) or V1_PREFIX.startswith(data):
        return None  # a prefix of either: more to come
    raise ProxyHeaderError("no PROXY header")


def _v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    fields = data[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(None, end + 2)  # what follows UNKNOWN is ignored (2.1)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1: expected TCP4 or TCP6 and four fields")
    version = 4 if fields[1] == b"TCP4" else 6
    src = _v1_address(fields[2], version)
    _v1_address(fields[3], version)
    for port in fields[4:6]:
        if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            raise ProxyHeaderError("PROXY v1: bad port")
        if len(port) > 1 and port[:1] == b"0":
            raise ProxyHeaderError("PROXY v1: port with a leading zero")
    return ProxyHeader(src, end + 2)


def _v1_address(field: bytes, version: int) -> str:
    try:
        ip = ipaddress.ip_address(field.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("PROXY v1: bad address") from None
    if ip.version != version:
        raise ProxyHeaderError("PROXY v1: address of the wrong family")
    return str(ip)


def _v2(data: bytes, max_bytes: int) -> ProxyHeader | None:
    if len(data) < _V2_FIXED:
        return None
    command, family = data[12], data[13]
    length = _V2_FIXED + int.from_bytes(data[14:16], "big")
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError("PROXY v2: unknown version or command")
    if length > max_bytes:
        raise ProxyHeaderError(f"PROXY v2 header longer than {max_bytes} bytes")
    if len(data) < length:
        return None
    if command == _LOCAL:
        return ProxyHeader(None, length)  # addresses, if any, are to be ignored (2.2)
    need = _ADDRESS_BYTES.get(family)
    if need is None:
        raise ProxyHeaderError("PROXY v2: not a TCP stream over IPv4 or IPv6")
    if length - _V2_FIXED < need:
        raise ProxyHeaderError("PROXY v2: address block shorter than its family's")
    if family == _TCP4:
        return ProxyHeader(str(ipaddress.IPv4Address(data[16:20])), length)
    if family == _TCP6:
        ip = ipaddress.IPv6Address(data[16:32])
        mapped = ip.ipv4_mapped
        return ProxyHeader(str(mapped if mapped is not None else ip), length)
    return ProxyHeader(None, length)
