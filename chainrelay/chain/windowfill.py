"""The recent window behind the block follower, filled when clients read there.

A node that just started (or whose automatic follower stopped for a while) knows the last
blocks' canonical hashes (the head tracker walks ``[head] backfill_blocks`` of them back from
its first head) but holds none of their receipts or logs: each first receipt read of such a
block costs two upstream calls (the receipt, then its block's fill, ``chain.fill``), and
every eth_getLogs window reaching them goes upstream until all its blocks were filled one by
one. Clients of a dapp read exactly these blocks: the transfers of the last minutes, logs
over the last twenty blocks.

So once clients show they read that window (``[subscriptions] fill_window_after_misses``
reads missing on its blocks: a receipt that went upstream, an eth_getLogs window reaching
blocks the node does not hold), the receipts of the whole window are filled at once, newest
first: the ``[subscriptions] fill_window_blocks``
blocks up to the one the follower's run starts after, one eth_getBlockReceipts each. Once
per run of the follower: a run that starts after a gap (an automatic follower that stopped
following) has its own window, whose blocks already filled or followed cost nothing again.
A node whose clients read no block data never pays it, nor one whose client looked up
one receipt.

This module decides when, and over which block numbers; ``BlockFiller.fill_window`` fills
them (coalesced with the fills of clients' misses, bounded, each block once, canonical
blocks only). Sans-I/O.
"""

from __future__ import annotations


class WindowFill:
    def __init__(self, depth: int, after_misses: int = 1) -> None:
        """``depth``: how many blocks back from the run's start the window reaches (0: the
        window is never filled); ``after_misses``: reads missing in it before it is."""
        self.depth = depth
        self.after_misses = after_misses
        # Reads that missed in this run's window so far.
        self._misses = 0
        # The block the follower's current run starts after (None: it never followed).
        self._after: int | None = None
        # The run whose window was filled (or is being filled).
        self._filled_after: int | None = None

    def following_after(self, number: int) -> None:
        """The follower starts a run with the block after ``number``: blocks up to
        ``number`` are not followed, and make this run's window."""
        if number != self._after:
            self._misses = 0
        self._after = number

    def due(self, low: int, high: int) -> range | None:
        """A client's read of blocks ``low``..``high`` found data the node does not hold.
        The window's block numbers to fill, newest first, when the read reaches into it,
        it is the ``after_misses``-th such read, and this run's window was not filled yet;
        else None."""
        after = self._after
        if self.depth <= 0 or after is None or after == self._filled_after:
            return None
        floor = max(0, after - self.depth + 1)
        if high < floor or low > after:
            return None  # blocks the follower delivers, or older than the window
        self._misses += 1
        if self._misses < self.after_misses:
            return None
        self._filled_after = after
        return range(after, floor - 1, -1)
