"""Who a feed child is, without sockets: the hub's challenge and a child relay's proof
(``tree.auth``), the proof in a hello (``tree.session``), and the bounds on anonymous
sessions per address and node (``tree.admission``)."""

from __future__ import annotations

import orjson
import pytest

from chainrelay.tree.admission import Admission, Refusal
from chainrelay.tree.auth import (
    AuthError,
    Challenge,
    ChildKeys,
    Credentials,
    Proof,
    auth_digest,
    parse_challenge,
    parse_proof,
)
from chainrelay.tree.frame import Signer, keccak
from chainrelay.tree.session import ControlError, Want, encode_hello, parse_hello

CHILD = Signer(keccak(b"feed auth test child"))
STRANGER = Signer(keccak(b"feed auth test stranger"))
CHILD_HEX = "0x" + CHILD.address.hex()
SECRET = "a shared secret of some length"
HUB = "chainrelay-0a1b2c3d"
NODE = "chainrelay-99887766"
KEYS = ChildKeys.of([CHILD_HEX, SECRET])


def challenge(hub: str = HUB) -> Challenge:
    return Challenge.fresh(hub)


# --- the proof ----------------------------------------------------------------------------
def test_a_signature_by_a_listed_key_shows_that_address() -> None:
    c = challenge()
    proof = Credentials(CHILD).prove(c, NODE)
    assert proof.signature is not None and len(proof.signature) == 65
    assert KEYS.verify(proof, c, NODE) == CHILD_HEX


def test_a_shared_secret_proves_by_hmac_and_never_crosses_the_wire() -> None:
    c = challenge()
    proof = Credentials(secret=SECRET).prove(c, NODE)
    assert proof.mac is not None and len(proof.mac) == 32
    assert SECRET.encode() not in orjson.dumps(proof.to_json())
    assert KEYS.verify(proof, c, NODE) == "child_keys[1]"


def test_a_signature_by_a_key_not_listed_is_refused() -> None:
    c = challenge()
    with pytest.raises(AuthError, match="not among") as err:
        KEYS.verify(Credentials(STRANGER).prove(c, NODE), c, NODE)
    assert err.value.reason == "unknown_key"


def test_a_wrong_secret_is_refused() -> None:
    c = challenge()
    with pytest.raises(AuthError) as err:
        KEYS.verify(Credentials(secret="another secret, just as long").prove(c, NODE), c, NODE)
    assert err.value.reason == "unknown_key"


@pytest.mark.parametrize("creds", [Credentials(CHILD), Credentials(secret=SECRET)])
def test_a_proof_made_for_one_challenge_is_refused_for_another(creds: Credentials) -> None:
    seen = challenge()
    proof = creds.prove(seen, NODE)
    with pytest.raises(AuthError) as err:
        KEYS.verify(proof, challenge(), NODE)  # the next connection's challenge
    assert err.value.reason == "unknown_key"


@pytest.mark.parametrize("creds", [Credentials(CHILD), Credentials(secret=SECRET)])
def test_a_proof_made_for_one_hub_is_refused_by_another(creds: Credentials) -> None:
    mine = challenge(HUB)
    proof = creds.prove(mine, NODE)
    # Another hub that happened to send the same value still has its own name.
    other = Challenge("chainrelay-ffffffff", mine.value)
    with pytest.raises(AuthError):
        KEYS.verify(proof, other, NODE)
    assert KEYS.verify(proof, mine, NODE) in (CHILD_HEX, "child_keys[1]")


def test_a_proof_made_for_one_node_name_is_refused_for_another() -> None:
    c = challenge()
    proof = Credentials(CHILD).prove(c, NODE)
    with pytest.raises(AuthError):
        KEYS.verify(proof, c, "chainrelay-00000000")
    with pytest.raises(AuthError, match="node name") as err:
        KEYS.verify(proof, c, None)
    assert err.value.reason == "malformed"


def test_a_signature_that_recovers_no_key_is_malformed() -> None:
    c = challenge()
    good = Credentials(CHILD).prove(c, NODE).signature
    assert good is not None
    for sig in (good[:64] + b"\x07", b"\x00" * 65):
        with pytest.raises(AuthError) as err:
            KEYS.verify(Proof(signature=sig), c, NODE)
        assert err.value.reason == "malformed"


def test_the_digest_binds_every_field_and_refuses_names_that_could_run_together() -> None:
    value = b"\x01" * 32
    base = auth_digest(value, NODE, HUB)
    assert base != auth_digest(b"\x02" * 32, NODE, HUB)
    assert base != auth_digest(value, NODE + "x", HUB)
    assert base != auth_digest(value, NODE, HUB + "x")
    for node, hub in (("a\x00b", HUB), (NODE, ""), ("", HUB), (NODE, "x" * 65)):
        with pytest.raises(ValueError):
            auth_digest(value, node, hub)


MALFORMED_PROOFS = {
    "not an object": "0x00",
    "empty": {},
    "both kinds": {"signature": "0x" + "00" * 65, "hmac": "0x" + "00" * 32},
    "unknown kind": {"password": "hunter2"},
    "signature short": {"signature": "0x" + "00" * 64},
    "hmac long": {"hmac": "0x" + "00" * 33},
    "no 0x": {"hmac": "00" * 33},
    "not hex": {"hmac": "0x" + "zz" * 32},
    "a number": {"hmac": 12},
}


@pytest.mark.parametrize("value", MALFORMED_PROOFS.values(), ids=list(MALFORMED_PROOFS))
def test_a_malformed_proof_is_refused_as_such(value: object) -> None:
    with pytest.raises(AuthError) as err:
        parse_proof(value)
    assert err.value.reason == "malformed"
    hello = {"type": "hello", "version": 1, "streams": [{"stream": "s/b"}], "node": NODE}
    with pytest.raises(ControlError):
        parse_hello(orjson.dumps({**hello, "auth": value}))


def test_a_proof_rides_in_the_hello_and_needs_the_node_it_was_made_for() -> None:
    c = challenge()
    for proof in (Credentials(CHILD).prove(c, NODE), Credentials(secret=SECRET).prove(c, NODE)):
        hello = parse_hello(encode_hello([Want("s/b")], node=NODE, auth=proof))
        assert hello.auth == proof and hello.node == NODE
        assert parse_proof(proof.to_json()) == proof
    with pytest.raises(ControlError, match="node name"):
        parse_hello(encode_hello([Want("s/b")], auth=Credentials(CHILD).prove(c, NODE)))
    assert parse_hello(encode_hello([Want("s/b")], node=NODE)).auth is None


def test_the_challenge_header_round_trips_and_anything_else_is_no_challenge() -> None:
    c = challenge()
    assert parse_challenge(c.header()) == c
    assert challenge().value != c.value  # fresh each time
    bad = [
        None,
        "",
        c.value.hex(),
        f"{HUB} {c.value.hex()}",
        f"{HUB} 0x{c.value.hex()[:-2]}",
        f"{HUB} 0x{'zz' * 32}",
        f"bad/name 0x{c.value.hex()}",
        f"{HUB} 0x{c.value.hex()} extra",
    ]
    for header in bad:
        assert parse_challenge(header) is None, header


def test_child_keys_tell_addresses_from_secrets() -> None:
    keys = ChildKeys.of([CHILD_HEX.upper().replace("0X", "0x"), SECRET])
    assert keys.addresses == {CHILD.address} and keys.secrets == ((1, SECRET.encode()),)
    assert not ChildKeys.of([]) and KEYS


# --- anonymous sessions ----------------------------------------------------------------------
def admission(per_address: int = 2, max_sessions: int = 100, cooldown: float = 10.0) -> Admission:
    return Admission(
        per_address=per_address, max_sessions=max_sessions, cooldown=cooldown, idle_addresses=3
    )


def open_one(a: Admission, group: str, now: float, *, anonymous: bool = True) -> Refusal | None:
    refused = a.upgrade(group, now)
    return refused if refused is not None else a.hello(group, now, anonymous=anonymous)


def test_an_address_holds_at_most_its_share_and_a_relay_beside_it_is_not_refused() -> None:
    a = admission(per_address=2)
    assert open_one(a, "10.0.0.1", 0.0) is None
    assert open_one(a, "10.0.0.1", 0.0) is None
    refused = open_one(a, "10.0.0.1", 0.0)
    assert refused is not None and refused.reason == "anon_per_address"
    assert "10.0.0.1" in refused.message and refused.retry_after > 0
    assert open_one(a, "10.0.0.2", 0.0) is None  # another address: its own share
    assert open_one(a, "10.0.0.1", 0.0, anonymous=False) is None  # authenticated
    assert a.sessions == 3


def test_the_node_wide_cap_refuses_every_address_past_it() -> None:
    a = admission(per_address=5, max_sessions=3)
    for i in range(3):
        assert open_one(a, f"10.0.0.{i}", 0.0) is None
    refused = open_one(a, "10.0.0.9", 0.0)
    assert refused is not None and refused.reason == "anon_node_full"
    assert open_one(a, "10.0.0.9", 0.0, anonymous=False) is None
    a.gone("10.0.0.0", 1.0, counted=True)
    assert open_one(a, "10.0.0.9", 1.0) is None


def test_reconnecting_faster_than_the_cooldown_is_refused_with_when_to_retry() -> None:
    a = admission(per_address=1, cooldown=10.0)
    assert open_one(a, "10.0.0.1", 100.0) is None
    a.gone("10.0.0.1", 100.5, counted=True)
    refused = open_one(a, "10.0.0.1", 103.0)
    assert refused is not None and refused.reason == "anon_cooldown"
    assert refused.retry_after == pytest.approx(7.0)
    assert "retry in 7.0 s" in refused.message
    assert open_one(a, "10.0.0.1", 110.0) is None  # one cooldown after the last session began


def test_a_burst_of_its_share_then_one_per_cooldown() -> None:
    a = admission(per_address=3, cooldown=1.0)
    for _ in range(3):
        assert open_one(a, "10.0.0.1", 0.0) is None
    for _ in range(3):
        a.gone("10.0.0.1", 0.0, counted=True)
    opened = 0
    for step in range(45):  # 4.4 s of a client reconnecting every 0.1 s
        now = step * 0.1
        if open_one(a, "10.0.0.1", now) is None:
            opened += 1
            a.gone("10.0.0.1", now, counted=True)
    assert opened == 4  # at 1, 2, 3 and 4 s: one a second once the burst was spent at 0


def test_upgrades_waiting_for_their_hello_are_bounded_per_address() -> None:
    a = admission(per_address=2)
    assert a.upgrade("10.0.0.1", 0.0) is None
    assert a.upgrade("10.0.0.1", 0.0) is None
    refused = a.upgrade("10.0.0.1", 0.0)
    assert refused is not None and refused.reason == "anon_per_address"
    a.gone("10.0.0.1", 0.0, counted=False)  # one never said hello
    assert a.upgrade("10.0.0.1", 0.0) is None


def test_state_is_kept_only_for_addresses_open_or_owed_and_idle_ones_are_bounded() -> None:
    a = admission(per_address=1, cooldown=10.0)
    for i in range(10):
        assert open_one(a, f"10.0.1.{i}", 0.0) is None
        a.gone(f"10.0.1.{i}", 0.0, counted=True)
    assert len(a) == 3  # idle_addresses: the newest three still owe their cooldown
    assert a.sessions == 0
    assert open_one(a, "10.0.1.9", 1.0) is not None  # remembered
    assert open_one(a, "10.0.1.0", 1.0) is None  # forgotten: a fresh burst
    a.gone("10.0.1.0", 1.0, counted=True)
    b = admission(per_address=1, cooldown=0.0)
    assert open_one(b, "10.0.0.1", 0.0) is None
    b.gone("10.0.0.1", 0.0, counted=True)
    assert len(b) == 0  # no cooldown: nothing owed, nothing kept
