"""Which heads go out to head listeners (the newHeads fan-out) ahead of their block.

A head the tracker adopts as the next block after the last head the listeners got, whose
header an upstream pushed (``head.pushed``), is announced at once, while the follower
fetches its block and receipts; the block's event then comes with ``announced`` set, for
its logs. A head that is not the next one (a gap the tracker walked back to fill, a reorg,
a header only polled) waits for the fetch, so heads go out in chain order, each once. The
price: a client that asks for a block as soon as its newHeads arrives may be answered
before the follower has warmed the cache with it. Sans-I/O: the follower calls in.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from chainrelay.chain.events import HeadListener
from chainrelay.chain.head import Header

log = logging.getLogger(__name__)


class HeadAnnouncer:
    def __init__(self) -> None:
        self.listeners: list[HeadListener] = []
        # The last head whose header head listeners got, early or with its block: the next
        # head goes out early only if it is this one's child.
        self._tip: tuple[int, str] = (-1, "")
        # number -> hash of heads announced early whose block is not delivered yet.
        self._announced: dict[int, str] = {}

    def add_listener(self, fn: HeadListener) -> None:
        self.listeners.append(fn)

    def remove_listener(self, fn: HeadListener) -> None:
        with contextlib.suppress(ValueError):
            self.listeners.remove(fn)

    def reset(self, number: int, block_hash: str) -> None:
        """The follower starts following after head ``number``: nothing announced yet."""
        self._tip = (number, block_hash)
        self._announced.clear()

    def announce(self, h: Header, payload: dict[str, Any] | None) -> None:
        """Give head listeners ``h``'s pushed header (``payload``) now if it is the next
        head they are due; otherwise it goes out with its block, after the fetch."""
        if payload is None:
            return  # polled, not pushed: the fetch derives the header
        if self._tip != (h.number - 1, h.parent_hash):
            return
        self._tip = (h.number, h.hash)
        self._announced[h.number] = h.hash
        for fn in list(self.listeners):
            try:
                fn(payload)
            except Exception:
                log.exception("head listener failed")

    def delivered(self, number: int, block_hash: str) -> bool:
        """The block of this head is delivered: True if its header went out early; else it
        goes out with the block and is the tip from now on."""
        if self._announced.pop(number, None) == block_hash:
            return True
        self._tip = (number, block_hash)
        return False

    def passed_over(self, number: int, block_hash: str) -> None:
        """The block of this head was given up: the next head follows it all the same."""
        self._announced.pop(number, None)
        self._tip = (number, block_hash)
