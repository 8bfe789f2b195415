"""``chainrelay keygen``: a new secp256k1 key for an origin (``[tree] key_file``), a
sequencer (``chainrelay publish --key-file``) or a relay (``[tree] node_key_file``), and the
address the others list (``[tree] trust``, ``[[batches.streams]] sequencers``,
``[tree] child_keys``, ``subscribe --trust``).

The file holds the key in hex, as every ``*_file`` setting reads it; it is created with
mode 0600 and never over an existing file: a key that signed batches or frames is an
identity, and replacing it by accident would orphan everything that trusts it.
"""

from __future__ import annotations

import os
from pathlib import Path

from eth_account import Account


def new_key() -> tuple[str, str]:
    """A fresh key (from the OS's random source) and its address, both 0x-hex."""
    account = Account.create()
    return "0x" + bytes(account.key).hex(), account.address


def write_key(path: str | Path) -> str:
    """Write a new key to ``path`` (0600, refusing an existing file); its address."""
    key, address = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return address
