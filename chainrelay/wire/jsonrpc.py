"""JSON-RPC 2.0 framing: parse requests, splice ids into cached answers, read upstream answers.

Sans-I/O: bytes in, objects or bytes out. Answers are kept as the raw JSON bytes of their
``result`` member so that a cache hit is one concatenation with the caller's id, with no
re-encoding, and an upstream's answer reaches the client byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from chainrelay.errors import (
    BatchTooLarge,
    InvalidRequest,
    ParseError,
    RequestError,
)

Params = list[Any] | dict[str, Any]

NULL_ID = b"null"
_RESULT_KEY = b'"result"'
_ERROR_KEY = b'"error"'
_WS = b" \t\r\n"
# A number token of twenty digits or more may be an integer past 64 bits, which orjson
# turns into a float: such bodies are parsed again with the stdlib, which keeps them
# exact. Number tokens follow "[", "," or ":"; hex strings (quoted) never match.
_LONG_INT = re.compile(rb"[\[,:]\s*-?\d{20}")


@dataclass(slots=True)
class Call:
    """One request: ``id`` is the caller's id already encoded as JSON, None for a notification."""

    id: bytes | None
    method: str
    params: Params
    # False when the caller omitted "params": forwarded upstream exactly as it came.
    has_params: bool = True


# An item of a parsed body: a call to serve, or an error answer already encoded.
Item = Call | bytes


# orjson (3.12 on) returns its output in the buffer it grew while writing, never trimmed:
# 2 bytes hold 4 KiB, a 700-byte log 8 KiB. An output that is kept (an id for as long as
# its call runs, a memo key for a head) is copied into bytes of its own size, or a batch
# of 1,000 calls pins 4 MiB in ids alone.


def kept(data: bytes) -> bytes:
    """``data`` (an orjson output) in an allocation of its own size."""
    return bytes(memoryview(data))


def _encode_id(value: Any) -> bytes | None:
    if value is None:
        return NULL_ID
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value  # exact at any size, as JSON writes it
    if isinstance(value, str):
        return kept(orjson.dumps(value))
    if isinstance(value, float):
        return None  # caller re-parses with the stdlib, see parse_body
    raise InvalidRequest("invalid id: must be a string, number or null")


def _call_from(obj: Any) -> Item:
    if not isinstance(obj, dict):
        return encode_error(NULL_ID, InvalidRequest.code, "invalid request: not an object")
    id_bytes: bytes | None
    if "id" in obj:
        try:
            id_bytes = _encode_id(obj["id"])
        except RequestError as exc:
            return encode_error(NULL_ID, exc.code, exc.message)
        if id_bytes is None:  # float id: keep the caller's spelling
            id_bytes = json.dumps(obj["id"]).encode()
    else:
        id_bytes = None
    reply_id = id_bytes if id_bytes is not None else NULL_ID
    if obj.get("jsonrpc") != "2.0":
        return encode_error(reply_id, InvalidRequest.code, 'invalid request: jsonrpc must be "2.0"')
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return encode_error(
            reply_id, InvalidRequest.code, "invalid request: method must be a string"
        )
    if "params" in obj:
        params = obj["params"]
        if params is None:
            params, has = [], False
        elif isinstance(params, list | dict):
            has = True
        else:
            return encode_error(
                reply_id, InvalidRequest.code, "invalid request: params must be an array or object"
            )
    else:
        params, has = [], False
    return Call(id_bytes, method, params, has)


def _loads_exact(body: bytes | str) -> Any:
    """Parse keeping integers beyond 64 bits exact (orjson turns them into floats)."""
    return json.loads(body)


def parse_body(body: bytes, max_batch: int) -> tuple[list[Item], bool]:
    """Parse an HTTP body or WebSocket message into calls and ready error answers.

    Returns ``(items, is_batch)``. Raises ``ParseError`` for bytes that are not JSON,
    ``InvalidRequest`` for an empty batch and ``BatchTooLarge`` past ``max_batch``.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"parse error: {exc}") from None
    if _LONG_INT.search(body) is not None:
        doc = _loads_exact(body)
    if isinstance(doc, list):
        if not doc:
            raise InvalidRequest("invalid request: empty batch")
        if len(doc) > max_batch:
            raise BatchTooLarge(f"batch of {len(doc)} exceeds the limit of {max_batch}")
        if any(isinstance(o, dict) and isinstance(o.get("id"), float) for o in doc):
            doc = _loads_exact(body)
        return [_call_from(o) for o in doc], True
    if isinstance(doc, dict) and isinstance(doc.get("id"), float):
        doc = _loads_exact(body)
    return [_call_from(doc)], False


_ID_NAME = b'"id"'
# The id member, its token copied into answers as it came, so only spellings the full path
# would echo byte for byte: a non-negative integer without leading zeros ("-0" comes back
# as 0), null, or a string of printable ASCII without escapes; then the member ends.
_ID_MEMBER = re.compile(
    rb'"id"[ \t\r\n]*:[ \t\r\n]*(0|[1-9][0-9]*|null|"[ !#-\[\]-~]*")(?=[ \t\r\n]*[,}])'
)
_ID_SEARCH = _ID_MEMBER.search
_ID_HEAD = re.compile(rb'"id"[ \t\r\n]*:[ \t\r\n]*')


def split_id(body: bytes) -> tuple[bytes, bytes] | None:
    """``(id token, body without it)`` for a single call whose id can be found without
    parsing: the only ``"id"`` in the body, a member holding a plain integer, ``null`` or
    a plain string. None otherwise. Two bodies with the same remainder are the same call,
    once the remainder is known to hold the call's own id where the token was
    (``id_probe``).

    This is the cache-hit fast path's key: a few scans in C and no decoding.
    """
    if body[:1] != b"{":
        return None
    at = body.find(_ID_NAME)
    if at < 0:
        return None
    m = _ID_MEMBER.match(body, at)
    if m is None:
        return None
    start, end = m.span(1)
    if body.find(_ID_NAME, end) >= 0:
        return None
    return body[start:end], body[:start] + body[end:]


def id_at(body: bytes) -> int:
    """Where the id token of a body that ``split_id`` splits starts (-1 for any other):
    the remainder with another token put back there is the same call under that id."""
    if body[:1] != b"{":
        return -1
    m = _ID_MEMBER.match(body, body.find(_ID_NAME))
    return -1 if m is None else m.start(1)


def split_token(data: bytes) -> tuple[bytes, bytes] | None:
    """``split_id`` of the first plain ``"id"`` member in any bytes that hold one call (a
    body, or an HTTP request with its head), without making sure it is the only ``"id"``:
    for looking up a remainder that was checked to hold just one (``single_id``) when it
    was stored; an equal remainder then holds just one too."""
    m = _ID_SEARCH(data)
    if m is None:
        return None
    start, end = m.span(1)
    return data[start:end], data[:start] + data[end:]


def single_id(rest: bytes) -> bool:
    """Whether a remainder of ``split_token`` holds no other ``"id"`` than the split one."""
    return rest.count(_ID_NAME) == 1


def id_probe(rest: bytes) -> bool:
    """Whether a remainder of ``split_id`` holds the top-level id where the token was,
    and not in a nested object while the real id is spelled otherwise (escaped or
    spaced): only then may any token put back there stand for the call's id. Costs a
    decode: called once per remainder, when it is first remembered."""
    m = _ID_HEAD.match(rest, rest.find(_ID_NAME))
    if m is None:
        return False
    at = m.end()
    try:
        doc = orjson.loads(rest[:at] + b'"\\u0000"' + rest[at:])
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and doc.get("id") == "\x00"


def encode_result(id_bytes: bytes, result: bytes) -> bytes:
    """The answer to a call, from the raw JSON of its result: the cache-hit splice."""
    return b'{"jsonrpc":"2.0","id":' + id_bytes + b',"result":' + result + b"}"


def encode_error(id_bytes: bytes, code: int, message: str, data: Any = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return b'{"jsonrpc":"2.0","id":' + id_bytes + b',"error":' + orjson.dumps(err) + b"}"


def encode_error_raw(id_bytes: bytes, error: bytes) -> bytes:
    """An upstream's error member, passed through as it was sent."""
    return b'{"jsonrpc":"2.0","id":' + id_bytes + b',"error":' + error + b"}"


_ANSWER_OPEN = b'{"jsonrpc":"2.0","id":'
_ANSWER_OPEN_LEN = len(_ANSWER_OPEN)
_RESULT_MEMBER = b',"result":'
_ERROR_MEMBER = b',"error":'
# Digits an upstream id may have on the way back: ids we send are counters.
_MAX_ID_DIGITS = 20


# The usual answer to a read, checked by one scan: this codec's layout with an integer id
# and a result that is a string without escapes (a hex quantity or data), null, true or
# false. JSON as it stands, with its three members once each, so nothing is decoded.
_PLAIN_RESULT = re.compile(
    rb'\{"jsonrpc":"2\.0","id":(?:0|[1-9][0-9]{0,19}),"result":'
    rb'(?:"[ !#-\[\]-~]*"|null|true|false)\}'
).fullmatch


def readdress(raw: bytes, id_bytes: bytes) -> tuple[bytes, bool] | None:
    """An upstream's answer to one call, addressed to the caller's id ``id_bytes`` without
    decoding it: ``(answer, is_error)``, the upstream's bytes but for the id.

    Only for the layout this codec writes (and geth, erigon and anvil send): ``jsonrpc``,
    an integer ``id``, then a ``result`` or a non-null ``error`` member up to the closing
    brace, the whole of it JSON (decoded to check it, never encoded again). None for any
    other layout, and for bytes that are not JSON: such an answer is decoded
    (``parse_answer``), which refuses what is not an answer."""
    if _PLAIN_RESULT(raw) is not None:
        return _ANSWER_OPEN + id_bytes + raw[raw.find(b",", _ANSWER_OPEN_LEN) :], False
    if not raw.startswith(_ANSWER_OPEN) or raw[-1:] != b"}":
        return None
    comma = raw.find(b",", _ANSWER_OPEN_LEN, _ANSWER_OPEN_LEN + _MAX_ID_DIGITS + 1)
    if comma < 0 or not raw[_ANSWER_OPEN_LEN:comma].isdigit():
        return None
    if raw.startswith(_RESULT_MEMBER, comma):
        member, key = "result", _RESULT_KEY
    elif raw.startswith(_ERROR_MEMBER, comma):
        member, key = "error", _ERROR_KEY
    else:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    # Three members, the third the one found and spelled once (a duplicate is read as its
    # last copy by the full path), and an error that is one: "error":null is no error.
    if (
        len(doc) != 3
        or next(reversed(doc)) != member
        or (member == "error" and doc[member] is None)
        or raw.count(key) != 1
    ):
        return None
    return _ANSWER_OPEN + id_bytes + raw[comma:], member == "error"


def join_batch(parts: list[bytes]) -> bytes:
    return b"[" + b",".join(parts) + b"]"


def encode_request(id_: int, method: str, params: Params | None) -> bytes:
    """A request to an upstream. ``params`` None omits the member, as the caller did."""
    doc: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        doc["params"] = params
    try:
        return orjson.dumps(doc)
    except TypeError:  # an integer beyond 64 bits
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(slots=True)
class Answer:
    """An upstream's answer to one call: exactly one of ``result``/``error`` is set (raw JSON)."""

    result: bytes | None
    error: bytes | None
    # The decoded result, when someone already paid for decoding it.
    value: Any = None
    # The exact JSON of each element of a large result decoded piecewise, when it is an
    # array (receipts), or of its transactions (a block): the cache's entries for one
    # receipt or transaction, with no encoding again (``wire.pieces.result_parts``).
    parts: list[bytes] | None = None

    @property
    def is_empty(self) -> bool:
        return self.result in (b"null", b"[]", b'"0x"')

    def error_message(self) -> str:
        if self.error is None:
            return ""
        try:
            err = orjson.loads(self.error)
        except orjson.JSONDecodeError:
            return ""
        return str(err.get("message", "")) if isinstance(err, dict) else ""


def _member_tail(body: bytes, key: bytes) -> bytes | None:
    """Raw bytes of the member ``key`` when it is the object's last member, else None."""
    at = body.find(key)
    if at < 0:
        return None
    i = at + len(key)
    n = len(body)
    while i < n and body[i] in _WS:
        i += 1
    if i >= n or body[i] != 0x3A:  # ':'
        return None
    end = n
    while end and body[end - 1] in _WS:  # no copy of a large body to strip its tail
        end -= 1
    if end == 0 or body[end - 1] != 0x7D:  # '}'
        return None
    raw = body[i + 1 : end - 1].strip(_WS)
    return raw or None


def parse_answer(body: bytes) -> Answer:
    """Read an upstream's answer to a single call, keeping ``result`` as its raw bytes.

    ``value`` is orjson's decoding, in which an integer past 64 bits is a float; the raw
    bytes stay exact. The answer is scanned for such integers only when its member has to
    be encoded again (it is not the last one): on a large block that scan costs several
    times the decoding itself.

    Raises ``ValueError`` for an answer that is not a JSON-RPC response object.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # a number too large even for a float: the stdlib reads it
            doc = _loads_exact(body)
        except ValueError:
            raise ValueError("upstream answer is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("upstream answer is not an object")
    last = next(reversed(doc), None)
    if doc.get("error") is not None:
        raw = _member_tail(body, _ERROR_KEY) if last == "error" else None
        if raw is None:
            raw = _encode_member(body, "error")
        return Answer(None, raw)
    if "result" not in doc:
        raise ValueError("upstream answer has neither result nor error")
    raw = None
    # Slicing is exact only when "result" is the last member and appears once before it.
    if last == "result" and body.count(_RESULT_KEY) == 1:
        raw = _member_tail(body, _RESULT_KEY)
    if raw is None:
        raw = _encode_member(body, "result")
    return Answer(raw, None, doc["result"])


def _encode_member(body: bytes, member: str) -> bytes:
    """A top-level member of ``body`` encoded compactly, exact for integers of any size."""
    doc = _loads_exact(body) if _LONG_INT.search(body) is not None else orjson.loads(body)
    return dumps_exact(doc[member])


def dumps_exact(value: Any) -> bytes:
    """Compact JSON of ``value``, exact for integers of any size."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()
