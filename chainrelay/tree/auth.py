"""Who a feed child is, sans-I/O: the hub's challenge, a child relay's proof, its check.

A hub with ``[tree] child_keys`` tells authenticated child relays from anonymous
subscribers. The rules:

- The hub answers every ``/feed`` upgrade with a fresh random challenge and its own name
  in one response header (``CHALLENGE_HEADER``: ``<hub> 0x<32 bytes>``), so a child knows
  both before it sends its hello, and a child that ignores the header (an older one, a
  plain subscriber) sends the hello it always sent.
- A child relay with a node key proves itself in its hello (``auth``): a secp256k1
  signature (``signature``) over ``auth_digest(challenge, node, hub)``; the hub recovers
  the address and looks it up in ``child_keys``. A child that shares a secret with the hub
  instead sends an HMAC-SHA256 of the same digest under the secret (``hmac``); the hub
  tries each secret of ``child_keys`` with ``hmac.compare_digest``. The secret itself
  never crosses the wire.
- The digest holds the challenge (fresh per connection: a proof seen once is worth nothing
  on the next connection), the child's node name (the name its ``held`` reports count
  under) and the hub's name (a proof made for one hub is refused by every other).
- A proof that does not check out closes the session (4401): a relay whose key is wrong
  should hear so at once, not be served as an anonymous subscriber it never meant to be.
  A hub without ``child_keys`` takes no proof into account.

What this does not stop: a parent a child links to could pass on another hub's challenge
and name as its own and forward the child's proof there (a relay in the middle). Only a
child that pins what it expects of its parent could tell; the tree's children link to the
parents their operator configured.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass
from hashlib import sha256

from chainrelay.tree.frame import FrameError, Signer, keccak, recover

# The upgrade response header that carries the hub's name and its challenge.
CHALLENGE_HEADER = "Chainrelay-Feed-Challenge"
CHALLENGE_BYTES = 32
# Keeps a proof from ever being valid as a frame's or a batch's signature, and the other
# way round (each has its own domain).
AUTH_DOMAIN = b"chainrelay/feed-auth/v1\x00"
SIGNATURE_LEN = 65
HMAC_LEN = 32
# A node's and a hub's name: what ``tree.session`` allows for a node (its Via name),
# never a NUL, so the digest's fields cannot run into each other.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


class AuthError(ValueError):
    """A proof that is malformed or does not check out; ``reason`` names why, for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Challenge:
    """What the hub sent one connection: its own name and a fresh random value."""

    hub: str
    value: bytes

    @classmethod
    def fresh(cls, hub: str) -> Challenge:
        return cls(hub, secrets.token_bytes(CHALLENGE_BYTES))

    def header(self) -> str:
        return f"{self.hub} 0x{self.value.hex()}"


def parse_challenge(header: str | None) -> Challenge | None:
    """The challenge in a ``CHALLENGE_HEADER`` value; None for no header or a malformed one
    (a hub that asks nothing gets no proof)."""
    if header is None:
        return None
    parts = header.split()
    if len(parts) != 2 or not _NAME.fullmatch(parts[0]):
        return None
    text = parts[1]
    if len(text) != 2 + 2 * CHALLENGE_BYTES or not text.startswith("0x"):
        return None
    try:
        return Challenge(parts[0], bytes.fromhex(text[2:]))
    except ValueError:
        return None


def auth_digest(challenge: bytes, node: str, hub: str) -> bytes:
    """What a child signs (or MACs): its node name and the hub's, bound to one challenge."""
    if not _NAME.fullmatch(node) or not _NAME.fullmatch(hub):
        raise ValueError("node and hub names are 1-64 letters, digits, '.', '_' or '-'")
    return keccak(AUTH_DOMAIN + challenge + node.encode() + b"\x00" + hub.encode())


@dataclass(frozen=True, slots=True)
class Proof:
    """A hello's ``auth``: a signature (65 bytes) or an HMAC (32 bytes)."""

    signature: bytes | None = None
    mac: bytes | None = None

    def to_json(self) -> dict[str, str]:
        if self.signature is not None:
            return {"signature": "0x" + self.signature.hex()}
        assert self.mac is not None
        return {"hmac": "0x" + self.mac.hex()}


def parse_proof(v: object) -> Proof:
    """A hello's ``auth`` object; ``AuthError("malformed")`` for anything else."""
    if not isinstance(v, dict) or len(v) != 1:
        raise AuthError("malformed", "auth must be an object with signature or hmac")
    ((kind, text),) = v.items()
    size = {"signature": SIGNATURE_LEN, "hmac": HMAC_LEN}.get(kind)
    if size is None or not isinstance(text, str) or len(text) != 2 + 2 * size:
        raise AuthError("malformed", f"auth.{kind} must be 0x and {size or 'N'} bytes of hex")
    if not text.startswith("0x"):
        raise AuthError("malformed", f"auth.{kind} must be 0x-prefixed hex")
    try:
        raw = bytes.fromhex(text[2:])
    except ValueError:
        raise AuthError("malformed", f"auth.{kind} must be 0x-prefixed hex") from None
    return Proof(signature=raw) if kind == "signature" else Proof(mac=raw)


@dataclass(frozen=True, slots=True)
class ChildKeys:
    """``[tree] child_keys``: the addresses whose signature, and the secrets whose HMAC,
    make a child an authenticated relay. Empty: the hub authenticates no one (every named
    child counts as a relay, as before there were keys)."""

    addresses: frozenset[bytes] = frozenset()
    secrets: tuple[tuple[int, bytes], ...] = ()  # (its index in child_keys, the secret)

    @classmethod
    def of(cls, entries: list[str]) -> ChildKeys:
        """Each entry a 0x-prefixed 20-byte address, or else a shared secret."""
        addresses = {bytes.fromhex(e[2:]) for e in entries if is_address(e)}
        shared = tuple((i, e.encode()) for i, e in enumerate(entries) if not is_address(e))
        return cls(frozenset(addresses), shared)

    def __bool__(self) -> bool:
        return bool(self.addresses or self.secrets)

    def verify(self, proof: Proof, challenge: Challenge, node: str | None) -> str:
        """Who ``proof`` shows the child to be (``0x<address>``, or ``child_keys[i]`` for
        a secret);
        ``AuthError`` if it shows no one in these keys."""
        if node is None:
            raise AuthError("malformed", "auth needs the node name it was made for")
        digest = auth_digest(challenge.value, node, challenge.hub)
        if proof.signature is not None:
            try:
                who = recover(proof.signature, digest)
            except FrameError:
                raise AuthError("malformed", "auth.signature recovers no key") from None
            if who not in self.addresses:
                raise AuthError("unknown_key", f"0x{who.hex()} is not among this node's child_keys")
            return "0x" + who.hex()
        assert proof.mac is not None
        found = None
        for i, secret in self.secrets:
            # Every secret tried, each in constant time: how many matched bytes is no clue.
            if hmac.compare_digest(proof.mac, _mac(secret, digest)) and found is None:
                found = f"child_keys[{i}]"
        if found is None:
            raise AuthError("unknown_key", "auth.hmac matches none of this node's child_keys")
        return found


def is_address(entry: str) -> bool:
    return _ADDRESS.fullmatch(entry) is not None


def _mac(secret: bytes, digest: bytes) -> bytes:
    return hmac.new(secret, digest, sha256).digest()


class Credentials:
    """A child relay's own key (``[tree] node_key``) or shared secret (``node_secret``):
    what answers a parent's challenge."""

    def __init__(self, signer: Signer | None = None, secret: str = "") -> None:
        self.signer = signer
        self.secret = secret.encode()

    def __bool__(self) -> bool:
        return self.signer is not None or bool(self.secret)

    def prove(self, challenge: Challenge, node: str) -> Proof:
        digest = auth_digest(challenge.value, node, challenge.hub)
        if self.signer is not None:
            return Proof(signature=self.signer.sign(digest))
        return Proof(mac=_mac(self.secret, digest))
