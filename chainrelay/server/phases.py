"""Where an HTTP connection is in its byte stream, and what moves it: the one table of
``HttpProtocol``'s states (in h11's spirit: transitions are data, not branches).

The phase decides who reads the next bytes: the fast paths (``IDLE``), the held head's
body (``HELD``), httptools (``HEAD``, ``BODY``, ``REFUSED``), a WebSocket session
(``UPGRADED``), or nobody: after the last answer, what still comes is dropped
(``LINGERING``). Whether reading is paused is apart from it (``Paused``): a connection in
any phase may owe too many answers, or have a client that does not read them.
"""

from __future__ import annotations

import enum
import typing


class Phase(enum.Enum):
    # Members are keys of TRANSITIONS, looked up per message: hashed by identity (C-level),
    # not by name as Enum does (a Python call).
    __hash__ = object.__hash__

    IDLE = "idle"  # between messages: the fast paths may take the next read
    HELD = "held"  # a lone POST head kept for its body's read (HttpProtocol._hold_head)
    HEAD = "head"  # httptools is inside a request head
    BODY = "body"  # httptools is past the head, inside the body or at the message's end
    REFUSED = "refused"  # the message was answered 413/431: the rest of it is ignored
    UPGRADED = "upgraded"  # a WebSocket session owns the connection for good
    # The last answer is written and the write side shut: what the client still sends is
    # read and dropped (bounded), so that it reads its answer rather than a reset.
    LINGERING = "lingering"


class Event(enum.Enum):
    __hash__ = object.__hash__

    BEGIN = "begin"  # httptools starts a message
    HEADERS = "headers"  # httptools ends a head that is kept
    REFUSE = "refuse"  # the head or body is over its limit (431, 413)
    COMPLETE = "complete"  # httptools ends a message
    HOLD = "hold"  # a read that is a lone POST head is kept
    RELEASE = "release"  # the next read joins the head kept
    UPGRADE = "upgrade"  # a WebSocket handshake is accepted
    LINGER = "linger"  # the connection's last answer is written (Connection: close)


_P, _E = Phase, Event
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (_P.IDLE, _E.BEGIN): _P.HEAD,
    (_P.IDLE, _E.HOLD): _P.HELD,
    (_P.HELD, _E.RELEASE): _P.IDLE,
    (_P.HEAD, _E.HEADERS): _P.BODY,
    (_P.HEAD, _E.REFUSE): _P.REFUSED,
    (_P.BODY, _E.REFUSE): _P.REFUSED,
    # A head refused while it still came in (too large before its end): its end is read
    # and refused with it.
    (_P.REFUSED, _E.HEADERS): _P.REFUSED,
    (_P.BODY, _E.COMPLETE): _P.IDLE,
    (_P.REFUSED, _E.COMPLETE): _P.IDLE,
    # httptools ends an upgrade request's message before it stops at the upgrade.
    (_P.IDLE, _E.UPGRADE): _P.UPGRADED,
    (_P.BODY, _E.UPGRADE): _P.UPGRADED,
}
# Any connection not upgraded lingers once its last answer is out, and stays so: httptools
# may still end the message it was reading, which changes nothing.
TRANSITIONS.update({(p, _E.LINGER): _P.LINGERING for p in _P if p is not _P.UPGRADED})
TRANSITIONS.update({(_P.LINGERING, e): _P.LINGERING for e in _E})


def on(event: Event) -> dict[Phase, Phase]:
    """The rows of ``TRANSITIONS`` for one event, by phase: a connection looks up its next
    phase in one of these (keyed by one member, looked up without building a tuple)."""
    return {phase: after for (phase, e), after in TRANSITIONS.items() if e is event}


class Paused:
    """Why reading is paused, as bits of an int; it resumes once no reason is left. Plain
    ints, not an IntFlag: the bits are tested on every read and answer, and an IntFlag's
    ``&`` runs Python code (about 1 µs)."""

    # More answers owed than limits.max_pending_per_connection.
    BACKLOG: typing.Final = 1
    # The transport's buffer is full: a client that does not read its answers.
    WRITES: typing.Final = 2
    # Part of a read is left to parse in a later loop turn (a pipelined flood).
    TURN: typing.Final = 4
