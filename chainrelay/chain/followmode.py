"""When the block follower fetches blocks (``follow``): ``always``; ``never`` only while
someone listens; ``auto`` (the default) also while clients read block, transaction, receipt
or log data, hit or miss, within the last ``follow_recent`` blocks.

A miss starts following at once; reads answered from what following warmed keep it going
(counted per head: the reads made since the last head), so a dapp reading new blocks is
followed as long as it reads, not only until its reads start to hit.

One eth_getBlockByHash and one eth_getBlockReceipts per block then replace the
per-transaction receipt misses and the latest block's miss; a node nobody reads blocks
from costs its upstreams only its head. Sans-I/O: the follower asks, and starts or stops.
"""

from __future__ import annotations

from chainrelay import defaults
from chainrelay.config import FOLLOW_MODES

# Reads the follower answers once it follows blocks: a miss on one of them means a client
# reads new blocks' data, which following would have made a hit.
FOLLOWER_SERVED = frozenset(
    {
        "eth_getBlockByNumber",
        "eth_getBlockByHash",
        "eth_getBlockReceipts",
        "eth_getTransactionByHash",
        "eth_getTransactionReceipt",
        # From the logs of blocks it delivered or filled (``chain.logstore``).
        "eth_getLogs",
    }
)


class FollowMode:
    def __init__(
        self,
        follow: str = defaults.FOLLOW_BLOCKS,
        follow_recent: int = defaults.FOLLOW_RECENT_BLOCKS,
    ) -> None:
        if follow not in FOLLOW_MODES:
            raise ValueError(f"follow must be one of {FOLLOW_MODES}")
        self.always = follow == "always"
        self.auto = follow == "auto"
        self.follow_recent = follow_recent
        # Clients' reads keep an automatic follower following up to this block number.
        self._interest_until = -1
        # Clients' reads of FOLLOWER_SERVED methods counted so far (see ``note_reads``).
        self._reads = 0

    def note_miss(self, method: str, head: int) -> bool:
        """A client's cache miss of ``method`` at head ``head``; True if it makes an
        automatic follower follow (a read of block data), up to ``follow_recent`` blocks on."""
        if not self.auto or method not in FOLLOWER_SERVED:
            return False
        self._interest_until = head + self.follow_recent
        return True

    def note_reads(self, reads: int, head: int) -> None:
        """``reads``: clients' reads of ``FOLLOWER_SERVED`` methods answered so far, hits
        included, seen as head ``head`` arrives; any since the last look (made at the head
        before it) keep an automatic follower following up to ``follow_recent`` blocks past
        that head, as a miss there would have."""
        if reads != self._reads:
            self._reads = reads
            if self.auto:
                until = head - 1 + self.follow_recent
                self._interest_until = max(self._interest_until, until)

    def wanted(self, listening: bool, head: int) -> bool:
        """Whether to follow at head ``head``; ``listening``: a block listener is there."""
        return self.always or listening or (self.auto and head <= self._interest_until)
