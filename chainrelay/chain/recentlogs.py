"""eth_getLogs answered from the blocks the follower delivered lately (the reorg window),
with no upstream call, when every block of the range is one of them and still canonical.
"""

from __future__ import annotations

from typing import Any

import orjson

from chainrelay.chain.events import BlockEvent
from chainrelay.chain.head import HeadTracker
from chainrelay.errors import InvalidParams
from chainrelay.rpc.policy import HeadView
from chainrelay.subscriptions.logfilter import LogFilter


class RecentLogs:
    def __init__(self, head: HeadTracker, window: int) -> None:
        self.head = head
        self.window = window
        # number -> (hash, logs) of the blocks delivered lately.
        self._blocks: dict[int, tuple[str, list[dict[str, Any]]]] = {}

    def note(self, events: list[BlockEvent]) -> None:
        """Events as the follower delivers them: blocks kept, retracted ones forgotten."""
        recent = self._blocks
        for ev in events:
            if ev.removed:
                if recent.get(ev.number, ("",))[0] == ev.hash:
                    del recent[ev.number]
            else:
                recent[ev.number] = (ev.hash, ev.logs)
                while len(recent) > self.window:
                    del recent[min(recent)]

    def answer(self, params: Any) -> bytes | None:
        """eth_getLogs's result as a JSON array; None (ask upstream) otherwise: a range
        reaching past these blocks, "pending", a filter this node would refuse (the
        upstream's own error is the transparent answer), anything odd."""
        if not isinstance(params, list) or len(params) != 1:
            return None
        try:
            flt = LogFilter.parse(params[0])
        except InvalidParams:
            return None
        view = self.head.view
        recent = self._blocks
        if flt.block_hash is not None:
            number = view.numbers.get(flt.block_hash)
            if number is None:
                return None
            low = high = number
        else:
            low_ = _resolve(flt.from_block, view)
            high_ = _resolve(flt.to_block, view)
            if low_ is None or high_ is None or low_ > high_ or high_ > view.number:
                return None
            low, high = low_, high_
        if high - low >= len(recent):
            return None
        out: list[dict[str, Any]] = []
        for n in range(low, high + 1):
            got = recent.get(n)
            if got is None or got[0] != view.canonical.get(n):
                return None
            out.extend(x for x in got[1] if flt.matches(x))
        return orjson.dumps(out)


def _resolve(ref: str | int | None, view: HeadView) -> int | None:
    """A filter's block bound as a number against ``view``; None: not answerable here."""
    if ref is None or ref == "latest":
        return view.number
    if isinstance(ref, int):
        return ref
    if ref == "safe":
        return view.safe if view.safe >= 0 else None
    if ref == "finalized":
        return view.finalized if view.finalized >= 0 else None
    if ref == "earliest":
        return 0
    return None  # "pending": the upstream's pending block
