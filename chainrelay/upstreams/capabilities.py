"""What an upstream has shown it cannot serve: methods it lacks, blocks it pruned.

A JSON-RPC error that a node answered is its real answer and goes back to the caller as it
is, with three exceptions, told apart by the wordings of ``WORDINGS`` (one table, each row
with where it was seen):

* ``UNSUPPORTED``: the node lacks the method ("method not found", -32601, a provider's
  plan without it). The method is marked unsupported there for ``[pool] capability_ttl``
  and the call is asked of an upstream that may have it.
* ``PRUNED``: the node no longer holds the state or block asked for ("missing trie node",
  "header not found", anvil's ``BlockOutOfRangeError`` ...). The upstream's lowest
  available block is raised past the block the call read (erpc's ``blockAvailability``
  lower bound, learned); calls for older blocks go to upstreams that have them, and an
  ``archive = true`` upstream is declared to have every block.
* ``SLOW_DOWN``: a provider's rate limit answered under HTTP 200: a 429 in other words,
  never counted against the upstream's health.

The caller gets the node's error only when no upstream could answer. Sans-I/O: the pool
reads the table and keeps one ``Capabilities`` per upstream; no clock of its own (``now``
is the caller's ``perf_counter``).
"""

from __future__ import annotations

import enum
import re

import orjson


class Verdict(enum.Enum):
    UNSUPPORTED = "unsupported"
    PRUNED = "pruned"
    SLOW_DOWN = "slow_down"


_U, _P, _S = Verdict.UNSUPPORTED, Verdict.PRUNED, Verdict.SLOW_DOWN

# (lower-case words in the error's message, verdict, where the wording comes from). A
# message matches a row when it holds every word of it. Wordings from erpc are those of
# its error normalizer (architecture/evm/error_normalizer.go, IsMissingDataError), which
# reads many providers' answers in production.
WORDINGS: tuple[tuple[tuple[str, ...], Verdict, str], ...] = (
    # --- the method is missing ------------------------------------------------------
    (("method not found",), _U, "JSON-RPC 2.0 -32601; anvil, nethermind, reth"),
    (
        ("does not exist/is not available",),
        _U,
        "geth: the method X does not exist/is not available",
    ),
    (("unsupported method",), _U, "erpc: providers' 'Unsupported method'"),
    (("method", "not supported"), _U, "erpc: 'method ... not supported'"),
    (("method is not whitelisted",), _U, "erpc: gateways' allow-lists"),
    (("is not included in your current plan",), _U, "erpc: paid plans without the method"),
    (("method", "is not available"), _U, "geth and providers: method not available"),
    # --- the block or its state is gone -----------------------------------------------
    (("missing trie node",), _P, "geth (hash scheme) pruned state; bsc#447, go-ethereum#26233"),
    (("header not found",), _P, "geth/reth: block unknown or pruned; reth#22874"),
    (
        ("historical state", "not available"),
        _P,
        "geth (path scheme): historical state X is not available",
    ),
    (("historical state", "unavailable"), _P, "erpc: historical state unavailable"),
    (("pruned history unavailable",), _P, "geth/reth EIP-4444 (code 4444); go-ethereum#31939"),
    (("no state available",), _P, "nethermind: No state available for block X"),
    (("not available due to pruning",), _P, "erigon: state.PrunedError"),
    (
        ("is not available: blocknum",),
        _P,
        "erigon 3: data before txNum is not available; erigon#13198",
    ),
    (("access to archive state",), _P, "infura: project ID does not have access to archive state"),
    (("running with state pruning",), _P, "openethereum: run with --pruning=archive"),
    (("blockoutofrangeerror",), _P, "anvil --prune-history: block height is H but requested was N"),
    (("requested data is not available",), _P, "erpc: providers' missing data"),
    (("height is not available",), _P, "erpc: avalanche and others"),
    # --- slow down (a 429 under HTTP 200) --------------------------------------------
    (("too many requests",), _S, "erpc: providers' rate limit"),
    (("rate limited",), _S, "erpc: providers' rate limit"),
    (("exceeded", "capacity"), _S, "alchemy: exceeded its compute units per second capacity"),
    (("requests limited to",), _S, "erpc: providers' rate limit"),
    (("exceeded the quota",), _S, "erpc: providers' rate limit"),
    (("reached the quota",), _S, "erpc: providers' rate limit"),
    (("request rate exceeded",), _S, "infura: project ID request rate exceeded"),
    (("under too much load",), _S, "erpc: providers' load shedding"),
)

METHOD_NOT_FOUND = -32601
# anvil's pruned answer names the block it holds and the one asked: "block height is H but
# requested was N". N past H is a block not mined yet there (a lagging node), not pruned.
_ANVIL_RANGE = re.compile(rb"block height is (\d+) but requested was (\d+)")


def classify(error: bytes | None) -> Verdict | None:
    """The verdict on an answered JSON-RPC error object (raw bytes); None: the node's real
    answer, returned as it is. Only errors pay for this (the decode): never a result."""
    if not error:
        return None
    try:
        doc = orjson.loads(error)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    message = doc.get("message")
    text = message.lower() if isinstance(message, str) else ""
    for words, verdict, _source in WORDINGS:
        if all(w in text for w in words):
            if verdict is _P and words == ("blockoutofrangeerror",):
                got = _ANVIL_RANGE.search(text.encode())
                if got is not None and int(got[2]) > int(got[1]):
                    return None  # not mined there yet: the lag check's business
            return verdict
    if doc.get("code") == METHOD_NOT_FOUND:
        return _U
    return None


class Capabilities:
    """What one upstream is known not to serve: methods (each until its mark ends) and
    blocks below ``lowest``. ``archive``: declared to hold every block (never learned)."""

    __slots__ = ("_lowest_until", "_unsupported", "archive", "lowest", "ttl")

    def __init__(self, *, archive: bool = False, ttl: float = 600.0) -> None:
        self.archive = archive
        self.ttl = ttl
        # The lowest block the upstream is known to hold (0: all; learned upwards only, a
        # pruning node's window only moves up), believed for ``ttl`` after it was last
        # raised: the node behind a URL may be replaced by one that holds more.
        self.lowest = 0
        self._lowest_until = 0.0
        # method -> perf_counter time its "unsupported" mark ends. Empty for nearly every
        # upstream: ``serves`` then costs one truth test.
        self._unsupported: dict[str, float] = {}

    def serves(self, method: str, block: int, now: float) -> bool:
        """Whether a call of ``method`` reading ``block`` (-1: none known) may be sent
        here: not marked unsupported, and the block not below what it holds."""
        if block >= 0 and block < self.lowest:
            if now < self._lowest_until:
                return False
            self.lowest = 0  # the mark ended: asked again, and learnt again if still so
        marks = self._unsupported
        if marks:
            until = marks.get(method)
            if until is not None:
                if until > now:
                    return False
                del marks[method]
        return True

    def learn(self, verdict: Verdict, method: str, block: int, now: float) -> bool:
        """Take in an answer judged ``verdict`` to ``method`` at ``block``: whether it taught
        anything (a new mark, a higher lowest block)."""
        if verdict is Verdict.UNSUPPORTED:
            known = self._unsupported.get(method, 0.0) > now
            self._unsupported[method] = now + self.ttl
            return not known
        if verdict is Verdict.PRUNED and not self.archive and block >= self.lowest:
            self.lowest = block + 1
            self._lowest_until = now + self.ttl
            return True
        return False

    def unsupported(self, now: float) -> list[str]:
        """The methods marked unsupported now (for the operator's view)."""
        return sorted(m for m, until in self._unsupported.items() if until > now)
