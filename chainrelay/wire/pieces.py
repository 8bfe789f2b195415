"""Decoding a large JSON answer a piece at a time, so that no one turn of the event loop
holds it for the whole answer.

A block's receipts are about 2 MB of JSON: one ``orjson.loads`` of them takes 5 to 13 ms on
a 2-core machine, in one call that holds the GIL (a thread would not help, and pickling the
result back from a process costs as much as parsing it). Here the answer is decoded with the
stdlib's C scanner (``json.scanner.c_make_scanner``), one element at a time for the arrays
that make an answer large (a ``result`` array: receipts, logs; a block's ``transactions``),
and the decoding generator yields after every ``step`` characters or so, for its driver to
let the event loop run (``chainrelay.slices``).

Each element of those arrays is decoded from its own span of the text, so that span is also
its exact JSON, byte for byte as the upstream sent it: the cache entry of one transaction or
one receipt is that slice, with no encoding again (``Decoded.parts``).

Only objects at the top two levels and arrays at the top three are walked member by member;
anything deeper is one scanner call (a receipt, a transaction: a few microseconds). The
result is the same objects ``orjson.loads`` gives for the same text, with these
differences, which never reach a client (answers stay the upstream's bytes): an integer past
64 bits stays exact (orjson makes it a float). Text this decoder does not take the same way
as orjson (``NaN``, lone surrogate escapes, bytes that are not UTF-8, anything malformed)
raises ``ValueError``: the caller decodes it the usual way, which decides as before.

Sans-I/O: no asyncio; the caller drives the generator.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

# Walked member by member (deeper containers are decoded whole, in one scanner call): the
# answer's envelope and a result object (depth 0 and 1); arrays down to a result object's
# members (depth 2: a block's transactions).
_OBJECT_DEPTH = 1
_ARRAY_DEPTH = 2

_WS = re.compile(r"[ \t\n\r]*")
# A \uD800-\uDFFF escape: the stdlib takes a lone one, orjson refuses it.
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")

# Pieces of an answer: () the answer object, ("result",) its result, ("result",
# "transactions") a block's transactions.
Path = tuple[str, ...]
_RESULT: Path = ("result",)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# The stdlib's scanner in C (one value from a position: (value, end), StopIteration where
# none starts), and its string reader (a string's contents from after its quote).
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder(parse_constant=_refuse_constant)  # type: ignore[arg-type]
)
_SCANSTRING = "scanstring"
scanstring: Callable[[str, int, bool], tuple[str, int]] = getattr(json.decoder, _SCANSTRING)


@dataclass(slots=True)
class Decoded:
    """A JSON text decoded piecewise: the value, and exact spans (start, end) in the text,
    by path from the top (``Path``): of the elements of each array walked (``spans``), and
    of each member of an object walked (``members``; of a name given twice, the last, whose
    value the object holds)."""

    value: Any
    spans: dict[Path, list[tuple[int, int]]]
    members: dict[Path, tuple[int, int]]


class _Walk:
    def __init__(self, text: str, step: int) -> None:
        self.text = text
        self.step = step
        self.mark = 0  # where the text was when the generator last yielded
        self.spans: dict[Path, list[tuple[int, int]]] = {}
        self.members: dict[Path, tuple[int, int]] = {}

    def value(self, pos: int, path: Path) -> Generator[None, None, tuple[Any, int]]:
        s = self.text
        c = s[pos : pos + 1]
        if c == "{" and len(path) <= _OBJECT_DEPTH:
            return (yield from self.object(pos + 1, path))
        if c == "[" and len(path) <= _ARRAY_DEPTH:
            return (yield from self.array(pos + 1, path))
        try:
            got, end = _scan(s, pos)
        except StopIteration:
            raise ValueError(f"no JSON value at {pos}") from None
        except RecursionError:
            raise ValueError(f"nested too deep at {pos}") from None
        if end - self.mark >= self.step:
            self.mark = end
            yield
        return got, end

    def array(self, pos: int, path: Path) -> Generator[None, None, tuple[list[Any], int]]:
        s = self.text
        out: list[Any] = []
        spans: list[tuple[int, int]] = []
        self.spans[path] = spans
        pos = _WS.match(s, pos).end()  # type: ignore[union-attr]
        if s[pos : pos + 1] == "]":
            return out, pos + 1
        item = (*path, "[]")
        while True:
            got, end = yield from self.value(pos, item)
            out.append(got)
            spans.append((pos, end))
            pos = _WS.match(s, end).end()  # type: ignore[union-attr]
            c = s[pos : pos + 1]
            if c == "]":
                return out, pos + 1
            if c != ",":
                raise ValueError(f"expected ',' or ']' at {pos}")
            pos = _WS.match(s, pos + 1).end()  # type: ignore[union-attr]

    def object(self, pos: int, path: Path) -> Generator[None, None, tuple[dict[str, Any], int]]:
        s = self.text
        out: dict[str, Any] = {}
        pos = _WS.match(s, pos).end()  # type: ignore[union-attr]
        if s[pos : pos + 1] == "}":
            return out, pos + 1
        while True:
            if s[pos : pos + 1] != '"':
                raise ValueError(f"expected a member name at {pos}")
            key, pos = scanstring(s, pos + 1, True)
            pos = _WS.match(s, pos).end()  # type: ignore[union-attr]
            if s[pos : pos + 1] != ":":
                raise ValueError(f"expected ':' at {pos}")
            pos = _WS.match(s, pos + 1).end()  # type: ignore[union-attr]
            member = (*path, key)
            out[key], end = yield from self.value(pos, member)
            self.members[member] = (pos, end)
            pos = _WS.match(s, end).end()  # type: ignore[union-attr]
            c = s[pos : pos + 1]
            if c == "}":
                return out, pos + 1
            if c != ",":
                raise ValueError(f"expected ',' or '}}' at {pos}")
            pos = _WS.match(s, pos + 1).end()  # type: ignore[union-attr]


def decode_steps(text: str, step: int) -> Generator[None, None, Decoded]:
    """Decode the JSON ``text``, yielding after about every ``step`` characters decoded.
    Raises ``ValueError`` for text it does not take (see the module's docstring)."""
    if _SURROGATE.search(text) is not None:
        raise ValueError("surrogate escape: decoded whole")
    walk = _Walk(text, step)
    start = _WS.match(text, 0).end()  # type: ignore[union-attr]
    value, end = yield from walk.value(start, ())
    if _WS.match(text, end).end() != len(text):  # type: ignore[union-attr]
        raise ValueError(f"extra data at {end}")
    return Decoded(value, walk.spans, walk.members)


def slices(data: bytes, text: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each span of ``text``, which is ``data`` decoded from UTF-8."""
    if len(data) == len(text):  # ASCII: a character is a byte
        return [data[a:b] for a, b in spans]
    return [text[a:b].encode() for a, b in spans]


def result_parts(data: bytes, text: str, got: Decoded, at: Path = ()) -> list[bytes] | None:
    """The exact bytes of the elements of the value at path ``at`` of ``got`` (``text``,
    which is ``data`` decoded) when it is an array, or of its ``transactions`` when it is an
    object holding an array of them (a block); None otherwise."""
    value = got.value
    for name in at:
        value = value[name]
    items = value if isinstance(value, list) else None
    path = at
    if isinstance(value, dict) and isinstance(value.get("transactions"), list):
        items, path = value["transactions"], (*at, "transactions")
    spans = got.spans.get(path)
    # Spans are of the last array walked at a path: the value's when it is an array (of a
    # name given twice, the first value an array and the last not, spans are left behind).
    if items is None or spans is None or len(spans) != len(items):
        return None
    return slices(data, text, spans)


@dataclass(slots=True)
class DecodedAnswer:
    """An upstream's answer to one call with a result, decoded piecewise: ``result`` its
    exact bytes, ``value`` its decoding, ``parts`` (see ``result_parts``)."""

    result: bytes
    value: Any
    parts: list[bytes] | None


def answer_steps(body: bytes, step: int) -> Generator[None, None, DecodedAnswer]:
    """An upstream's answer with a ``result`` decoded piecewise (``decode_steps``). Raises
    ``ValueError`` for anything else (an error answer, not an answer, not JSON this decoder
    takes): ``parse_answer`` reads it, as every answer was read before."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    got = yield from decode_steps(text, step)
    doc = got.value
    if not isinstance(doc, dict) or "result" not in doc or doc.get("error") is not None:
        raise ValueError("not an answer with a result")
    start, end = got.members[_RESULT]
    raw = body[start:end] if len(body) == len(text) else text[start:end].encode()
    return DecodedAnswer(raw, doc["result"], result_parts(body, text, got, _RESULT))
