"""The front door asks who each request is: on the fast path (``_plain_post``), through
httptools (pipelined requests, each its own client) and on a PROXY protocol listener. No
sockets: bytes into the protocol object, a recording transport, and a JSON-RPC handler that
records the identity each body was handed with."""

from __future__ import annotations

from typing import Any

import orjson

from chainrelay.access.door import Door
from chainrelay.access.forwarded import Trusted, parse_networks
from chainrelay.access.identity import Identity, for_address
from chainrelay.access.keys import KeyRing, client_key
from chainrelay.config import LimitsConfig
from chainrelay.metrics import Metrics
from chainrelay.server.http import HttpProtocol, HttpServer, ProxiedHttpProtocol, Routes
from tests.protocol.test_access import V1_TCP6, V2_LOCAL, V2_NLB, V2_TCP4
from tests.protocol.test_http_fast_path import RecordingTransport, answers

KEY = "the-key-of-carol-000111"
CAROL = client_key("carol", "default")
BODY = b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}'


class PeerTransport(RecordingTransport):
    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default


class Front:
    def __init__(self, door: Door | None, proxy_protocol: bool = False) -> None:
        self.seen: list[Identity] = []
        routes = Routes(self._rpc, None, None)
        self.server = HttpServer(
            routes, LimitsConfig(), Metrics(), door=door, proxy_protocol=proxy_protocol
        )

    def _rpc(self, body: bytes, who: Identity) -> bytes:
        self.seen.append(who)
        return b'{"jsonrpc":"2.0","id":1,"result":"0x1"}'

    def connect(self, peer: str) -> tuple[HttpProtocol, PeerTransport]:
        cls = ProxiedHttpProtocol if self.server.proxy_protocol else HttpProtocol
        proto = cls(self.server)
        transport = PeerTransport(peer)
        proto.connection_made(transport)
        return proto, transport


def post(headers: str = "", target: str = "/") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


def door(keys: bool = False, required: bool = False) -> Door:
    ring = KeyRing([(KEY, CAROL)]) if keys else None
    return Door(Trusted(parse_networks(["10.0.0.0/8"])), keys=ring, required=required)


async def test_behind_a_trusted_proxy_each_request_is_its_own_client() -> None:
    front = Front(door())
    proto, transport = front.connect("10.0.0.1")
    # The fast path (one plain POST a read), then two pipelined in one read (httptools).
    proto.data_received(post("X-Forwarded-For: 198.51.100.1\r\n"))
    proto.data_received(
        post("X-Forwarded-For: 6.6.6.6, 198.51.100.2\r\n")
        + post("X-Forwarded-For: 198.51.100.3\r\nConnection: keep-alive\r\n")
    )
    proto.data_received(post())  # no header: the proxy itself
    assert front.seen == [
        for_address("198.51.100.1"),
        for_address("198.51.100.2"),
        for_address("198.51.100.3"),
        for_address("10.0.0.1"),
    ]
    assert [a.status for a in answers(transport.out)] == [200] * 4
    # A trusted proxy's connections are no one client's: not counted per address.
    assert "10.0.0.1" not in front.server.per_ip


async def test_a_forged_header_from_an_untrusted_peer_changes_nothing() -> None:
    front = Front(door())
    proto, _ = front.connect("203.0.113.8")
    proto.data_received(post("X-Forwarded-For: 198.51.100.1\r\n"))
    proto.data_received(post("X-Forwarded-For: 198.51.100.1\r\nConnection: keep-alive\r\n") * 2)
    assert front.seen == [for_address("203.0.113.8")] * 3
    assert front.server.per_ip["203.0.113.8"] == 1


async def test_keys_on_both_paths_and_the_same_401_for_missing_and_wrong() -> None:
    front = Front(door(keys=True, required=True))
    proto, transport = front.connect("203.0.113.8")
    proto.data_received(post(f"Authorization: Bearer {KEY}\r\n"))
    proto.data_received(post(target=f"/k/{KEY}") * 2)
    proto.data_received(post(f"X-Api-Key: {KEY}\r\n", target=f"/{KEY}"))
    assert front.seen == [CAROL.identity] * 4
    proto.data_received(post())  # missing
    proto.data_received(post("X-Api-Key: the-key-of-carol-000112\r\n"))  # wrong
    proto.data_received(post(target="/k/nope") * 2)  # wrong, through httptools
    got = answers(transport.out)
    assert [a.status for a in got] == [200] * 4 + [401] * 4
    assert len(front.seen) == 4
    bodies = {a.body for a in got[4:]}
    assert len(bodies) == 1 and orjson.loads(bodies.pop())["error"]["code"] == -32001
    assert all(a.headers[b"www-authenticate"] == b"Bearer" for a in got[4:])


async def test_proxy_protocol_names_the_connection_and_refuses_what_is_not_one() -> None:
    front = Front(door(), proxy_protocol=True)
    for header, client in [
        (V2_TCP4, "198.51.100.22"),
        (V2_NLB, "203.0.113.50"),
        (V1_TCP6, "2001:db8::/64"),
        (V2_LOCAL, "10.0.0.1"),
    ]:
        front.seen.clear()
        proto, transport = front.connect("10.0.0.1")
        data = header + post()
        for i in range(len(data)):  # a byte a read: the header split anywhere
            proto.data_received(data[i : i + 1])
        assert front.seen == [Identity(client)], header
        assert [a.status for a in answers(transport.out)] == [200]
        proto.connection_lost(None)
    # Malformed: closed, nothing answered, nothing handed on.
    front.seen.clear()
    for bad in (b"POST / HTTP/1.1\r\n", V2_TCP4[:11] + b"X", b"PROXY TCP4 " + b"9" * 2000):
        proto, transport = front.connect("10.0.0.1")
        proto.data_received(bad)
        assert transport.closed and not transport.out, bad
    # A PROXY header from a peer that is not a trusted proxy: closed at once.
    proto, transport = front.connect("203.0.113.8")
    assert transport.closed
    assert front.seen == []
    assert not front.server.per_ip  # the malformed were never counted; the others went


UPGRADE = (
    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{}\r\n"
)


async def test_a_websocket_keeps_its_key_until_the_key_is_read_away() -> None:
    front = Front(door(keys=True))
    keyed, keyed_out = front.connect("203.0.113.8")
    keyed.data_received(UPGRADE.format(f"X-Api-Key: {KEY}\r\n").encode())
    anonymous, _ = front.connect("203.0.113.9")
    anonymous.data_received(UPGRADE.format("").encode())
    assert keyed_out.out.startswith(b"HTTP/1.1 101")
    assert keyed.ws is not None and keyed.ws.who is CAROL.identity
    assert anonymous.ws is not None and anonymous.ws.who == for_address("203.0.113.9")
    refused, refused_out = front.connect("203.0.113.10")
    refused.data_received(UPGRADE.format("X-Api-Key: not-the-key-0000000000\r\n").encode())
    assert refused_out.out.startswith(b"HTTP/1.1 401") and refused.ws is None
    # The keys read again, carol's gone: her session is closed (1008), the other stays.
    other = client_key("dave", "default")
    front.server.set_door(Door(Trusted(()), keys=KeyRing([("the-key-of-dave-0001112", other)])))
    assert keyed.ws.closed and not anonymous.ws.closed
    assert b"\x03\xf0" in keyed_out.out[keyed_out.out.index(b"\r\n\r\n") :]  # close code 1008
