"""Decoding a large JSON answer a piece at a time, so that no one turn of the event loop
holds it for the whole answer.

A block's receipts are about 2 MB of JSON: one ``orjson.loads`` of them takes 5 to 13 ms on
a 2-core machine, in one call that holds the GIL (a thread would not help, and pickling the
result back from a process costs as much as parsing it). Here the arrays that make an answer
large (a ``result`` array: receipts, logs; a block's ``transactions``) are decoded one
element at a time, and the decoding generator yields after every ``step`` bytes or so, for
its driver to let the event loop run (``chainrelay.slices``). Two ways, the first that takes
the text:

* the split (``split_steps``): an answer laid out as nodes write it, compact, its array's
  elements objects, is cut at each element's end and each element decoded by orjson
  (2-2.5x the time of decoding the whole at once, all told, measured on 1,500 receipts
  and a block of 1,500 transactions);
* the walk (``decode_steps``): any other JSON text, with the stdlib's C scanner
  (``json.scanner``) one element at a time (2.7-3.7x).

Each element is decoded from its own span of the text, so that span is also its exact JSON,
byte for byte as the upstream sent it: the cache entry of one transaction or one receipt is
that slice, with no encoding again (``parts``).

The walk takes objects at the top two levels and arrays at the top three member by member;
anything deeper is one scanner call (a receipt, a transaction: a few microseconds). Both
give the objects ``orjson.loads`` gives for the same text, with one difference, which never
reaches a client (answers stay the upstream's bytes): an integer past 64 bits the walk keeps
exact (orjson makes it a float). Text neither takes as orjson would (``NaN``, surrogate
escapes, bytes that are not UTF-8, anything malformed) raises ``ValueError``: the caller
decodes it the usual way, which decides as before.

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

import orjson

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
    """An upstream's answer with a ``result`` decoded piecewise: split into its elements
    when laid out as nodes write it (``split_steps``), else walked (``decode_steps``).
    Raises ``ValueError`` for anything else (an error answer, not an answer, not JSON this
    decoder takes): ``parse_answer`` reads it, as every answer was read before."""
    try:
        return (yield from _split_answer_steps(body, step))
    except ValueError:
        pass
    return (yield from _walk_answer_steps(body, step))


def result_steps(data: bytes, step: int) -> Generator[None, None, tuple[Any, list[bytes] | None]]:
    """A bare result (a cached answer's raw JSON) decoded piecewise as ``answer_steps``
    decodes one in an answer: (value, parts). Raises ``ValueError`` as it does."""
    try:
        return (yield from split_steps(data, 0, len(data), step))
    except ValueError:
        pass
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    got = yield from decode_steps(text, step)
    return got.value, result_parts(data, text, got)


# --- the split: one orjson.loads per element ------------------------------------------
# The answer's envelope as geth, erigon and anvil write it (``readdress`` reads the same).
_ANSWER_OPEN = b'{"jsonrpc":"2.0","id":'
_RESULT_MEMBER = b',"result":'
_TRANSACTIONS = b'"transactions":['
_TRAILING_WS = b" \t\r\n"


def _split_answer_steps(body: bytes, step: int) -> Generator[None, None, DecodedAnswer]:
    """``split_steps`` of an answer's result, its envelope laid out as nodes write it
    (jsonrpc, an integer id, then the result up to the closing brace)."""
    if not body.startswith(_ANSWER_OPEN):
        raise ValueError("another envelope")
    comma = body.find(b",", len(_ANSWER_OPEN), len(_ANSWER_OPEN) + 21)
    if comma < 0 or not body[len(_ANSWER_OPEN) : comma].isdigit():
        raise ValueError("another envelope")
    if not body.startswith(_RESULT_MEMBER, comma):
        raise ValueError("another envelope")
    lo = comma + len(_RESULT_MEMBER)
    hi = len(body)
    while hi > lo and body[hi - 1] in _TRAILING_WS:
        hi -= 1
    if body[hi - 1 : hi] != b"}":
        raise ValueError("another envelope")
    value, parts = yield from split_steps(body, lo, hi - 1, step)
    return DecodedAnswer(body[lo : hi - 1], value, parts)


def split_steps(
    data: bytes, lo: int, hi: int, step: int
) -> Generator[None, None, tuple[Any, list[bytes] | None]]:
    """The JSON value ``data[lo:hi]``, when it is an array of objects (receipts, logs) or an
    object with an array of object ``transactions`` (a block) written compactly: split into
    its elements at each ``},{"NAME"`` (NAME the first element's first member, as every
    element of such an array begins), each decoded by ``orjson.loads``, yielding after
    every ``step`` bytes or so. (value, parts): parts the exact bytes of each element.

    A split in the wrong place cannot go unnoticed: a piece that is not a whole element
    does not decode (its brackets or a string are left open), so ``ValueError`` is raised
    for it as for any other shape; the caller then walks the text (``decode_steps``).
    The value is orjson's own decoding of each element: what decoding the whole gives."""
    first = data[lo : lo + 1]
    if first == b"[":
        if data[hi - 1 : hi] != b"]":
            raise ValueError("not an array")
        items, parts, _ = yield from _split_array(data, lo, hi - 1, step)
        return items, parts
    if first == b"{":
        at = data.find(_TRANSACTIONS, lo, hi)
        if at < 0 or data.find(_TRANSACTIONS, at + 1, hi) >= 0:
            raise ValueError("no one transactions array")
        opening = at + len(_TRANSACTIONS) - 1
        items, parts, closing = yield from _split_array(data, opening, -1, step, hi)
        value = orjson.loads(data[lo:opening] + b"[]" + data[closing + 1 : hi])
        # The array taken out was the object's own member, not one nested deeper.
        if not isinstance(value, dict) or value.get("transactions") != []:
            raise ValueError("transactions of another object")
        value["transactions"] = items
        return value, parts
    raise ValueError("neither an array nor an object")


def _split_array(
    data: bytes, opening: int, closing: int, step: int, limit: int = -1
) -> Generator[None, None, tuple[list[Any], list[bytes], int]]:
    """The elements of the array of objects opened at ``opening`` (closed at ``closing``,
    or found before ``limit`` when -1): (items, their bytes, where it closes).

    An element ends at a "}" followed by ',{"' (the next element), where its braces
    balance (one inside it closes an object of its own, and leaves them open); the last
    one at the array's close, or, when that is to be found, at the first "}]" where they
    balance. Each piece is decoded: one that balances but does not decode (a brace inside
    a string) raises ``ValueError``."""
    end = closing if closing >= 0 else limit
    pos = opening + 1
    if data[pos : pos + 1] == b"]":
        if closing >= 0 and closing != pos:
            raise ValueError("not an array")
        return [], [], pos
    if data[pos : pos + 1] != b"{":
        raise ValueError("not an array of objects")
    items: list[Any] = []
    parts: list[bytes] = []
    mark = pos
    count = data.count
    loads = orjson.loads
    at = pos
    while True:
        comma = data.find(b'},{"', at, end)
        if comma < 0:
            break
        cut = at = comma + 1
        if count(b"{", pos, cut) != count(b"}", pos, cut):
            continue  # inside the element
        part = data[pos:cut]
        try:
            items.append(loads(part))
        except orjson.JSONDecodeError:
            if closing >= 0:
                raise
            break  # past the array's close (what follows it holds the pattern too)
        parts.append(part)
        pos = cut + 1
        if pos - mark >= step:
            mark = pos
            yield
    if closing >= 0:
        part = data[pos:closing]
        items.append(loads(part))
        parts.append(part)
        return items, parts, closing
    at = pos
    while (close := data.find(b"}]", at, end)) >= 0:
        cut = at = close + 1
        if count(b"{", pos, cut) == count(b"}", pos, cut):
            part = data[pos:cut]
            items.append(loads(part))
            parts.append(part)
            return items, parts, cut
    raise ValueError("the array does not close")


def _walk_answer_steps(body: bytes, step: int) -> Generator[None, None, DecodedAnswer]:
    """``answer_steps`` by walking the text (``decode_steps``)."""
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
