"""Whole-request replays: a POST answered from cache, or forwarded uncached, found again by
its bytes, id aside.

The cheapest way in of ``HttpProtocol.data_received``: a read that, but for its id token,
is a request answered from cache before at this head is answered by splicing the new id
into the old answer, with no parsing and no decoding. ``HttpServer.learn_replay`` makes
the entries; the server's ``ReplayTable`` holds them for one head.

A request forwarded uncached before at this head (``rpc/forward.py``: a read at "pending",
say, that a wallet polls) is sent again the same way: its bytes name the call the
forwarder remembered, and it goes upstream under the new id with no parsing of its head
and no planning (``ForwardReplay``, made by ``HttpServer.learn_forward``).
"""

from __future__ import annotations

import typing
from collections.abc import Callable

if typing.TYPE_CHECKING:
    from chainrelay.access.identity import Identity
    from chainrelay.rpc.replay import Seen

# Per replay entry: the record, its dict slot and the answer's head, counted against
# ``limits.max_hit_table_bytes`` with the request and the answer it names.
REPLAY_ENTRY_OVERHEAD = 300
# An answer spliced around its id: ANSWER_OPEN, the id token, ANSWER_RESULT, the value, "}".
ANSWER_OPEN = b'{"jsonrpc":"2.0","id":'
ANSWER_RESULT = b',"result":'
# What follows a replay's X-Request-Id counter: the end of its line and of the head, then
# the answer up to its id.
REPLAY_OPEN = b"\r\n\r\n" + ANSWER_OPEN


class Replay:
    """A POST answered from cache whose bytes, id aside, come again: the answer's head (up
    to its X-Request-Id's counter, written fresh each time) and its body around the id (an
    id of the same length, so the Content-Length holds), its record, and the check that the
    record still answers, for this client (``Replayer.replay``: a method the client may
    not call is not replayed to it, whoever asked it first).

    Who a repeat is: ``who``, when the request's own bytes named it (an API key, or a
    client address a trusted proxy forwarded: the same bytes name the same client while
    the door's rules stand, and new rules clear every replay); None, when it is whoever
    the connection is. ``proxied``: whether it was learned on a connection of a trusted
    proxy; a repeat on the other kind of connection is not a replay (bytes a proxy's
    forwarding header names a client by are, from anyone else, only a claim)."""

    __slots__ = ("check", "head", "proxied", "record", "size", "suffix", "token_len", "who")

    def __init__(
        self,
        head: bytes,
        record: Seen,
        token_len: int,
        size: int,
        check: Callable[[Seen, Identity], bytes | None],
        who: Identity | None = None,
        proxied: bool = False,
    ) -> None:
        self.check = check
        self.who = who
        self.proxied = proxied
        self.head = head
        # The answer after the id: the record's value, which stays the same while the
        # record answers (``Replayer.replay`` checks that the cache holds it still).
        self.suffix = ANSWER_RESULT + record.value + b"}"
        self.record = record
        self.token_len = token_len
        self.size = size  # counted against limits.max_hit_table_bytes


def replay_size(_rest: bytes, replay: Replay) -> int:
    return replay.size


class ForwardReplay:
    """A POST forwarded uncached whose bytes, id aside, come again: where its body starts
    (the head is the same bytes each time), the length of the id token it was learned with
    (another length would not match its Content-Length), the key the forwarder remembers
    its call under (its body without the id: ``Replayer.again``), its answer's CORS lines,
    and who it is and where it was learned, as for a ``Replay``."""

    __slots__ = ("body_at", "cors", "proxied", "rest", "token_len", "who")

    def __init__(
        self,
        body_at: int,
        token_len: int,
        rest: bytes,
        cors: bytes,
        who: Identity | None,
        proxied: bool,
    ) -> None:
        self.body_at = body_at
        self.token_len = token_len
        self.rest = rest
        self.cors = cors
        self.who = who
        self.proxied = proxied


def forward_size(rest: bytes, replay: ForwardReplay) -> int:
    return len(rest) + len(replay.rest) + len(replay.cors) + REPLAY_ENTRY_OVERHEAD
