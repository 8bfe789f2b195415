"""Ids this node hands out for filters and subscriptions, written as geth writes them.

geth's ``rpc.encodeID`` prints the random bytes as hex and trims the leading zeros (an id
is a quantity to it): ``0x`` and at most 32 hex digits, never zero-padded. Clients compare
ids as strings, so a relay answering for geth writes them the same way.
Sans-I/O: randomness comes in as bytes.
"""

from __future__ import annotations

# Bytes of randomness in an id: geth's 16 (0x + up to 32 hex digits).
ID_BYTES = 16


def encode_id(random: bytes) -> str:
    """The id of ``random`` (``ID_BYTES`` bytes) as geth's ``encodeID`` writes it."""
    return "0x" + (random.hex().lstrip("0") or "0")
