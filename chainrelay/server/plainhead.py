"""What the head of a plain POST says, read without httptools.

The front door answers a read that holds exactly one ordinary keep-alive POST itself
(``HttpProtocol._plain_post``): a head httptools would read the same, whose body is framed
by one Content-Length and nothing else. This module is that head's grammar: whether a head
is one (``read_head``), and what in it changes the answer's own head (CORS, an X-Request-Id,
gzip). A client sends a few heads again and again (they differ in Content-Length), so the
server remembers what each says (``HttpServer.read_plain_head``). Sans-I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from chainrelay.server.compress import accepts_gzip

# A request head the fast path reads as httptools would: a POST line with a target of
# visible characters, then header lines of a token name, a colon and a value without
# control characters. Anything else (spaces in names or targets, folded lines, lines with
# no colon) goes to httptools, which refuses it.
_PLAIN_HEAD = re.compile(
    rb"POST [!-~]+ HTTP/1\.1(?:\r\n[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t -~\x80-\xff]*)*"
)
# Headers that take a POST off the fast path (``HttpProtocol._plain_post``).
# "Connection: keep-alive" alone changes nothing in HTTP/1.1 (requests, and so web3.py,
# sends it on every call); any other Connection header does.
SPECIAL = re.compile(
    rb"\r\n(?:transfer-encoding|upgrade|expect|via)[ \t]*:"
    rb"|\r\nconnection[ \t]*:(?![ \t]*keep-alive[ \t]*(?:\r\n|$))",
    re.I,
)
# The value of an Origin line as httptools gives it: leading blanks dropped, trailing kept.
_ORIGIN = re.compile(rb"\r\norigin:[ \t]*([^\r\n]*)", re.I)
# The lines of a head read without httptools that change its answer's head: its own
# X-Request-Id, and an Accept-Encoding (gzip). One scan of the head finds either; most
# requests have neither.
_ANSWER_LINES = re.compile(rb"\r\n(x-request-id|accept-encoding)[ \t]*:([^\r\n]*)", re.I)
_SPECIAL_OR_LINES = re.compile(
    SPECIAL.pattern + rb"|\r\n(?:x-request-id|accept-encoding)[ \t]*:", re.I
)
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d{1,10})[ \t]*(?=\r\n|$)", re.I)
# What a plain POST's head says (``read_head``): its Content-Length
# (-1: not a plain POST), its answer's CORS lines, whether it names its id, whether it
# takes gzip, and the id it names.
PlainHead = tuple[int, bytes, bool, bool, bytes | None]
NOT_PLAIN: PlainHead = (-1, b"", False, False, None)


def read_head(head: bytes, cors_lines: Callable[[bytes | None], bytes] | None) -> PlainHead:
    """What a POST's ``head`` (up to its blank line) says: its Content-Length, the CORS
    lines of its answer (``cors_lines`` of its first Origin, when origins are listed;
    None: none of its own), whether it names its id or takes gzip, the id it names.
    ``NOT_PLAIN`` when the head asks for more than a length-delimited body (chunks, an
    upgrade, Expect, Connection, a second Content-Length) or httptools would read it
    otherwise."""
    if _PLAIN_HEAD.fullmatch(head) is None:
        return NOT_PLAIN
    # One scan for the lines that take a POST off this path and those that change its
    # answer's head; most heads have neither, and pay for one scan, as before either.
    either = _SPECIAL_OR_LINES.search(head)
    if either is not None and SPECIAL.search(head, either.start()) is not None:
        return NOT_PLAIN
    length = CONTENT_LENGTH.search(head)
    if length is None or CONTENT_LENGTH.search(head, length.end()) is not None:
        return NOT_PLAIN
    cors = b""
    if cors_lines is not None:  # the first Origin line, as httptools' headers would give it
        origin = _ORIGIN.search(head)
        cors = cors_lines(origin.group(1) if origin is not None else None)
    named = gzip = False
    incoming = None
    if either is not None:
        for found in _ANSWER_LINES.finditer(head):
            if len(found.group(1)) == 12:  # x-request-id
                incoming = incoming or found.group(2).strip(b" \t")
                named = True
            elif accepts_gzip(found.group(2).strip(b" \t")):
                gzip = True
    return int(length.group(1)), cors, named, gzip, incoming
