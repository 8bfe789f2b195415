"""The relay tree's origin: each block this node's follower fetched, published as one frame.

The block follower (``chain.follower``) already fetches every new canonical block once, full,
with its receipts, and in chain order (a reorg's new blocks included). The origin signs
what its upstream answered, byte for byte, into one frame per block, encoded once; the
hub keeps it and fans it out to every child.
"""

from __future__ import annotations

import logging
from pathlib import Path

from eth_account import Account

from chainrelay.chain.events import BlockEvent
from chainrelay.chain.follower import BlockFollower
from chainrelay.config import TreeConfig
from chainrelay.errors import ConfigError
from chainrelay.tree import frame as feedframe
from chainrelay.tree.auth import Credentials
from chainrelay.tree.hub import FeedHub

log = logging.getLogger(__name__)


def load_signer(tree: TreeConfig) -> feedframe.Signer | None:
    """The origin key of ``tree`` (None: this node is no origin), loaded with eth-account:
    a hex key, a keystore JSON (with ``key_password``), or a file holding a hex key."""
    return _load_key(tree.key, tree.key_file, tree.key_password, "key")


def load_credentials(tree: TreeConfig) -> Credentials:
    """What this node answers its parents' challenges with (``tree.auth``): its node key
    (``node_key`` or ``node_key_file``, loaded as the origin key is), or its shared
    ``node_secret``; empty for a node that proves nothing."""
    signer = _load_key(tree.node_key, tree.node_key_file, tree.key_password, "node_key")
    return Credentials(signer, tree.node_secret)


def _load_key(secret: str, key_file: str, password: str, what: str) -> feedframe.Signer | None:
    if key_file:
        try:
            text = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"tree.{what}_file: {exc}") from None
        if text.startswith("{"):
            try:
                key = Account.decrypt(text, password)
            except ValueError as exc:
                raise ConfigError(f"tree.{what}_file: cannot decrypt the keystore: {exc}") from None
            return feedframe.Signer(bytes(key))
        secret = text
    if not secret:
        return None
    try:
        account = Account.from_key(secret)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"tree.{what}: not a secp256k1 private key ({exc})") from None
    return feedframe.Signer(bytes(account.key))


class Origin:
    """Signs and publishes the block follower's blocks on ``stream``."""

    def __init__(
        self, hub: FeedHub, follower: BlockFollower, signer: feedframe.Signer, stream: str
    ) -> None:
        self.hub = hub
        self.signer = signer
        self.stream = stream
        follower.add_fetched_listener(self._publish)

    def _publish(self, ev: BlockEvent, block_raw: bytes, receipts_raw: bytes | None) -> None:
        plain = feedframe.block_payload(block_raw, receipts_raw or b"null")
        raw = feedframe.encode(
            self.signer,
            kind=feedframe.KIND_BLOCK,
            stream=self.stream,
            position=ev.number,
            identity=bytes.fromhex(ev.hash[2:]),
            plain=plain,
        )
        self.hub.publish(raw)
