"""Who a client is, without sockets: the forwarding headers' walk (``access/forwarded.py``),
the PROXY protocol header (``access/proxyproto.py``, with the bytes HAProxy and AWS NLB
write), API keys (``access/keys.py``) and the door's answer (``access/door.py``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainrelay.access.door import REFUSAL_BODIES, Door, Refusal
from chainrelay.access.forwarded import (
    Trusted,
    client_from_forwarded,
    client_from_xff,
    parse_address,
    parse_networks,
)
from chainrelay.access.identity import Identity, for_address
from chainrelay.access.keys import KeyRing, client_key, path_key, presented
from chainrelay.access.proxyproto import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse

PROXIES = Trusted(parse_networks(["10.0.0.0/8", "192.0.2.1", "2001:db8:ffff::/48"]))


# --- X-Forwarded-For and Forwarded ----------------------------------------------------------
def test_xff_the_client_is_the_right_most_hop_that_is_not_a_trusted_proxy() -> None:
    # A client wrote "1.1.1.1" itself; its own address was appended by the outer proxy,
    # then the inner proxy's by the proxy that connected to the node.
    assert client_from_xff("1.1.1.1, 203.0.113.9, 10.1.2.3", PROXIES, 16) == "203.0.113.9"
    assert client_from_xff("203.0.113.9", PROXIES, 16) == "203.0.113.9"
    # IPv6, ports, brackets, IPv4-mapped.
    assert client_from_xff("2001:db8:1::5, 10.0.0.1", PROXIES, 16) == "2001:db8:1::5"
    assert client_from_xff("[2001:db8:1::5]:443", PROXIES, 16) == "2001:db8:1::5"
    assert client_from_xff("203.0.113.9:5555", PROXIES, 16) == "203.0.113.9"
    assert client_from_xff("::ffff:203.0.113.9", PROXIES, 16) == "203.0.113.9"


def test_xff_every_hop_trusted_or_garbage_gives_the_last_trusted_hop_or_none() -> None:
    assert client_from_xff("10.0.0.2, 10.0.0.1", PROXIES, 16) == "10.0.0.2"
    assert client_from_xff("evil, 10.0.0.1", PROXIES, 16) == "10.0.0.1"
    assert client_from_xff("", PROXIES, 16) is None
    assert client_from_xff("not-an-ip", PROXIES, 16) is None


def test_xff_walks_at_most_max_hops_of_a_huge_chain() -> None:
    chain = ", ".join(["203.0.113.7"] + ["10.0.0.1"] * 5000)
    # The client is 5000 hops left: beyond the bound, the last hop walked is charged.
    assert client_from_xff(chain, PROXIES, 16) == "10.0.0.1"
    assert client_from_xff(", ".join(["203.0.113.7"] + ["10.0.0.1"] * 3), PROXIES, 16) == (
        "203.0.113.7"
    )


def test_forwarded_reads_for_parameters_quoted_and_bracketed() -> None:
    value = 'for=1.1.1.1, for="[2001:db8:1::7]:4711";proto=https, for=10.0.0.3;by=10.0.0.9'
    assert client_from_forwarded(value, PROXIES, 16) == "2001:db8:1::7"
    assert client_from_forwarded("For=198.51.100.17;proto=http", PROXIES, 16) == ("198.51.100.17")
    # Obfuscated or unknown: the walk stops at the last trusted hop.
    assert client_from_forwarded("for=_hidden, for=10.0.0.3", PROXIES, 16) == "10.0.0.3"
    assert client_from_forwarded('for="unknown"', PROXIES, 16) is None
    assert client_from_forwarded("proto=https", PROXIES, 16) is None


def test_trusted_proxies_hold_addresses_and_networks_of_both_families() -> None:
    assert "10.255.0.1" in PROXIES
    assert "192.0.2.1" in PROXIES
    assert "192.0.2.2" not in PROXIES
    assert "2001:db8:ffff:1::1" in PROXIES
    assert "::ffff:10.0.0.1" in PROXIES  # a dual-stack socket's name for an IPv4 peer
    assert "nonsense" not in PROXIES
    assert "10.0.0.1" not in Trusted(())
    with pytest.raises(ValueError, match="not an address"):
        parse_networks(["10.0.0.0/33"])


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_forwarding_walks_take_any_text(value: str) -> None:
    for walk in (client_from_xff, client_from_forwarded):
        got = walk(value, PROXIES, 8)
        assert got is None or parse_address(got) is not None


# --- PROXY protocol ---------------------------------------------------------------------
# What HAProxy writes with ``send-proxy`` (proxy-protocol.txt 2.1's examples).
V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::11 56324 443\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
# ``send-proxy-v2``: PROXY command, TCP over IPv4, 12 bytes of addresses and ports.
V2_TCP4 = (
    V2_SIGNATURE
    + b"\x21\x11\x00\x0c"
    + bytes([198, 51, 100, 22, 10, 0, 0, 5])
    + (40000).to_bytes(2, "big")
    + (8545).to_bytes(2, "big")
)
V2_TCP6 = (
    V2_SIGNATURE
    + b"\x21\x21\x00\x24"
    + ipaddress.IPv6Address("2001:db8:7::9").packed
    + ipaddress.IPv6Address("2001:db8::1").packed
    + (40000).to_bytes(2, "big")
    + (8545).to_bytes(2, "big")
)
# AWS NLB: v2 over IPv4 with its TLV 0xEA (subtype 0x01: the VPC endpoint's id).
_NLB_TLV = b"\xea" + (23).to_bytes(2, "big") + b"\x01" + b"vpce-08d2bf15fac5001c9"
V2_NLB = (
    V2_SIGNATURE
    + b"\x21\x11"
    + (12 + len(_NLB_TLV)).to_bytes(2, "big")
    + bytes([203, 0, 113, 50, 172, 31, 0, 4])
    + (51234).to_bytes(2, "big")
    + (443).to_bytes(2, "big")
    + _NLB_TLV
)
# LOCAL: the balancer's own health check; no address.
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"

REQUEST = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"


@pytest.mark.parametrize(
    ("header", "source"),
    [
        (V1_TCP4, "192.168.0.1"),
        (V1_TCP6, "2001:db8::1"),
        (V1_UNKNOWN, None),
        (V2_TCP4, "198.51.100.22"),
        (V2_TCP6, "2001:db8:7::9"),
        (V2_NLB, "203.0.113.50"),
        (V2_LOCAL, None),
    ],
)
def test_proxy_headers_as_haproxy_and_nlb_write_them(header: bytes, source: str | None) -> None:
    assert parse(header + REQUEST) == ProxyHeader(source, len(header))
    # Read a byte at a time, it is "not yet" until it is whole.
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # no header at all
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",  # a field missing
        b"PROXY TCP4 2001:db8::1 192.168.0.11 56324 443\r\n",  # wrong family
        b"PROXY TCP6 192.168.0.1 2001:db8::11 56324 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 99999 443\r\n",  # bad port
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",
        b"PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY TCP4 " + b"1" * 120,  # a line past 107 bytes
        V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c" + bytes(12),  # bad signature
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # unknown command
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP
        V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216),  # a Unix socket
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # shorter than its family's block
        V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # 64 KiB announced: oversized
    ],
)
def test_malformed_proxy_headers_are_errors(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data, 1024)


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_any_bytes_parse_or_raise_only_proxy_header_error(data: bytes) -> None:
    for candidate in (data, V2_SIGNATURE + data, b"PROXY " + data):
        try:
            got = parse(candidate, 128)
        except ProxyHeaderError:
            continue
        assert got is None or 0 < got.length <= len(candidate)


# --- keys ---------------------------------------------------------------------------------
SECRET = "k3y-of-alice-0123456789"
ALICE = client_key("alice", "pro", ["eth_call"], ["https://app.example"])
BOB = client_key("bob", "default")
RING = KeyRing([(SECRET, ALICE), ("bobs-key-abcdefghijklmnop", BOB)])


def test_a_key_is_found_by_its_secret_only() -> None:
    assert RING.find(SECRET.encode()) is ALICE
    assert ALICE.identity == Identity("key:alice", "pro", "alice", frozenset({"eth_call"}))
    assert BOB.identity.methods is None  # the tier's
    assert RING.find(SECRET.encode()[:-1]) is None
    assert RING.find(SECRET.upper().encode()) is None
    assert RING.find(b"") is None
    assert RING.names() == {"alice", "bob"}
    assert len(RING) == 2


def test_a_key_comes_in_a_header_or_the_path() -> None:
    key = SECRET.encode()
    assert presented(b"Bearer " + key, None, b"/") == key
    assert presented(b"bearer  " + key + b" ", None, b"/") == key
    assert presented(None, key, b"/") == key
    assert presented(None, None, b"/k/" + key) == key
    assert presented(None, None, b"/" + key + b"?x=1") == key
    assert presented(None, None, b"/" + key + b"/") == key
    # The same key twice is one key; two different ones are a wrong key.
    assert presented(b"Bearer " + key, key, b"/k/" + key) == key
    assert presented(b"Bearer " + key, b"other-key-0123456789", b"/") == b""
    # No key: another scheme, a short path segment, a path of two segments.
    assert presented(b"Basic dXNlcjpwYXNz", None, b"/") is None
    assert presented(None, None, b"/rpc") is None
    assert presented(None, None, b"/v1/" + key) is None
    assert path_key(b"/k/x") == b"x"  # after /k/, a key of any shape: a wrong one
    assert presented(b"Bearer ", None, b"/") == b""  # an empty key: found by no ring


# --- the door -------------------------------------------------------------------------------
def _headers(**values: str) -> dict[bytes, bytes]:
    return {k.replace("_", "-").encode(): v.encode() for k, v in values.items()}


PROXY_CONN = for_address("10.0.0.1")
CLIENT_CONN = for_address("203.0.113.5")


def test_the_door_names_the_client_behind_a_trusted_proxy_only() -> None:
    door = Door(PROXIES)
    xff = _headers(x_forwarded_for="1.1.1.1, 198.51.100.4")
    assert door.admit(PROXY_CONN, True, xff.get, b"/") == for_address("198.51.100.4")
    # From a connection not from a trusted proxy, the header is never read.
    assert door.admit(CLIENT_CONN, False, xff.get, b"/") is CLIENT_CONN
    # IPv6 clients behind the proxy are grouped by their /64 like any other.
    got = door.admit(PROXY_CONN, True, _headers(x_forwarded_for="2001:db8:5:6::1").get, b"/")
    assert got == Identity("2001:db8:5:6::/64")
    # The header the operator did not choose is not read.
    fwd = _headers(forwarded="for=198.51.100.4")
    assert door.admit(PROXY_CONN, True, fwd.get, b"/") is PROXY_CONN
    assert Door(PROXIES, header="forwarded").admit(PROXY_CONN, True, fwd.get, b"/") == (
        for_address("198.51.100.4")
    )


def test_keys_name_the_client_and_a_wrong_key_is_refused_required_or_not() -> None:
    for required in (False, True):
        door = Door(PROXIES, keys=RING, required=required)
        bearer = _headers(authorization=f"Bearer {SECRET}")
        assert door.admit(CLIENT_CONN, False, bearer.get, b"/") is ALICE.identity
        path = f"/k/{SECRET}".encode()
        assert door.admit(CLIENT_CONN, False, _headers().get, path) is ALICE.identity
        wrong = _headers(x_api_key="not-a-key-of-anyone-000")
        assert door.admit(CLIENT_CONN, False, wrong.get, b"/") is Refusal.UNAUTHORIZED
        missing = door.admit(CLIENT_CONN, False, _headers().get, b"/")
        assert missing is (Refusal.UNAUTHORIZED if required else CLIENT_CONN)
    # The key wins over the proxied address: it is the key's limits that apply.
    door = Door(PROXIES, keys=RING)
    both = _headers(x_forwarded_for="198.51.100.4", x_api_key=SECRET)
    assert door.admit(PROXY_CONN, True, both.get, b"/") is ALICE.identity


def test_a_key_with_origins_is_refused_from_another_browser_origin() -> None:
    door = Door(Trusted(()), keys=RING)
    key = SECRET
    ok = _headers(x_api_key=key, origin="https://app.example")
    assert door.admit(CLIENT_CONN, False, ok.get, b"/") is ALICE.identity
    other = _headers(x_api_key=key, origin="https://evil.example")
    assert door.admit(CLIENT_CONN, False, other.get, b"/") is Refusal.ORIGIN
    # Not a browser (no Origin): allowed; a key without origins: any origin.
    assert door.admit(CLIENT_CONN, False, _headers(x_api_key=key).get, b"/") is ALICE.identity
    bob = _headers(x_api_key="bobs-key-abcdefghijklmnop", origin="https://evil.example")
    assert door.admit(CLIENT_CONN, False, bob.get, b"/") is BOB.identity


def test_refusals_answer_json_rpc_error_32001() -> None:
    import orjson

    for refusal, body in REFUSAL_BODIES.items():
        got = orjson.loads(body)
        assert got["error"]["code"] == -32001 and got["id"] is None, refusal


# --- config ---------------------------------------------------------------------------------
UPSTREAM = '[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:1"\n'
GOOD_KEY = 'name = "a"\nkey = "0123456789abcdef"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\ntrusted_proxies = ["10.0.0.0/33"]\n', "server.trusted_proxies"),
        ("[server]\nproxy_protocol = true\n", "server.proxy_protocol"),
        ('[server]\nclient_address_header = "x-real-ip"\n', "client_address_header"),
        ("[server]\nmax_forwarded_hops = 0\n", "server.max_forwarded_hops"),
        ('[[auth.keys]]\nname = "a"\nkey = "short"\n', r"auth.keys\[0\].key"),
        ('[[auth.keys]]\nname = "a b"\nkey = "0123456789abcdef"\n', r"auth.keys\[0\].name"),
        (f"[[auth.keys]]\n{GOOD_KEY}[[auth.keys]]\n{GOOD_KEY}", r"auth.keys\[1\].name"),
        (f'[[auth.keys]]\n{GOOD_KEY}tier = "gold"\n', r"no \[tiers.gold\]"),
        ('[auth]\nkeys_file = "/nonexistent/keys.toml"\n', "auth.keys_file"),
    ],
)
def test_config_refuses_what_would_misname_clients(text: str, message: str) -> None:
    from chainrelay.config import loads
    from chainrelay.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        loads(text + UPSTREAM, {})


def test_keys_come_from_config_and_the_keys_file_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chainrelay.config import load_keys, loads
    from chainrelay.errors import ConfigError

    file = tmp_path / "keys.toml"
    file.write_text('[[keys]]\nname = "b"\nkey = "${B_KEY}"\ntier = "pro"\n')
    text = f'[tiers.pro]\n[auth]\nkeys_file = "{file}"\n[[auth.keys]]\n{GOOD_KEY}' + UPSTREAM
    monkeypatch.setenv("B_KEY", "fedcba9876543210")  # ${ENV} expands in the file too
    cfg = loads(text, {})
    assert [(k.name, k.key, k.tier) for k in load_keys(cfg)] == [
        ("a", "0123456789abcdef", "default"),
        ("b", "fedcba9876543210", "pro"),
    ]
    file.write_text('[[keys]]\nname = "a"\nkey = "fedcba9876543210"\n')
    with pytest.raises(ConfigError, match="used twice"):
        load_keys(cfg)
