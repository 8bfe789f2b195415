"""The feed's compression, sans-I/O: Nitro's own ``Arbitrum-permessage-deflate``, and the
standard permessage-deflate beside it, as websockets extensions.

What Nitro does (OffchainLabs/nitro with gobwas/ws's ``wsflate``):

- ``wsbroadcastserver/utils.go`` renames the extension (``init``: ``wsflate.
  ExtensionNameBytes = "Arbitrum-" + "permessage-deflate"``), because both ends preset a
  static dictionary (``dictionary.go``; ``chainrelay.nitro.dictionary``) that no other
  client has. A Nitro node offering compression (``--node.feed.input.enable-compression``,
  on by default; ``broadcastclient.go``: ``wsflate.DefaultParameters.Option()``) sends
  exactly ``NITRO_OFFER``; a server offering only the standard extension is answered with
  nothing and the node reads plain text.
- Nitro's server (``wsbroadcastserver.go``: ``wsflate.Extension{Parameters:
  wsflate.DefaultParameters}``, whose ``Negotiate`` is in gobwas ``wsflate/extension.
  go``) takes the first offer of that name, declines one carrying
  ``server_max_window_bits`` (any value: it wants none), ignores
  ``client_max_window_bits``, and always answers ``NITRO_ANSWER``, whatever the offer held.
- The client counts compression as agreed only if the answer *equals* its offer (gobwas
  httphead ``Option.Equal``: the name and exactly these two parameters); otherwise it
  fails on the first compressed frame.
- With no context kept either way, Nitro's broadcaster (``clientmanager.go``,
  ``serializeMessage``) compresses each broadcast once, level 9 with the dictionary, the
  stream closed (``flate.Writer.Close``: a final block, the ``00 00 ff ff`` tail not cut),
  and writes the same bytes, RSV1 set, to every client that agreed.

Here the same: ``FeedDeflateFactory`` is the server side (one ``SharedDeflate`` per
endpoint: each distinct message is compressed once, however many clients get it, and the
bytes are kept for as long as the message is recent); ``FeedDeflateClientFactory`` is the
client side (the feed in, ``nitro-tail``), offering what Nitro's client offers and taking
what Nitro's server answers. The standard extension gets the same treatment (an RFC 7692
server may impose both ``no_context_takeover`` parameters, so it too compresses once), in
RFC 7692's form (a sync flush, its tail cut). A client sends nothing compressed: a feed
client sends no data messages, and an endpoint may always send a message uncompressed.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from websockets.exceptions import NegotiationError, PayloadTooBig, ProtocolError
from websockets.extensions.base import ClientExtensionFactory, Extension, ServerExtensionFactory
from websockets.frames import CONT, CTRL_OPCODES, Frame
from websockets.typing import ExtensionName, ExtensionParameter

from chainrelay.nitro.dictionary import FEED_DICTIONARY

NITRO_EXTENSION = "Arbitrum-permessage-deflate"
STANDARD_EXTENSION = "permessage-deflate"
SERVER_NO_CONTEXT = "server_no_context_takeover"
CLIENT_NO_CONTEXT = "client_no_context_takeover"
SERVER_MAX_BITS = "server_max_window_bits"
CLIENT_MAX_BITS = "client_max_window_bits"
# Byte for byte what Nitro's client sends and Nitro's server answers (gobwas httphead's
# ``WriteOptions``: ";" between the name and each parameter, no space).
NITRO_OFFER = f"{NITRO_EXTENSION};{SERVER_NO_CONTEXT};{CLIENT_NO_CONTEXT}"
NITRO_ANSWER = NITRO_OFFER
# Nitro's ``DeflateCompressionLevel`` (flate.BestCompression).
LEVEL = 9
TAIL = b"\x00\x00\xff\xff"  # RFC 7692: the end of a sync flush, cut by the sender
_PARAMS = (SERVER_NO_CONTEXT, CLIENT_NO_CONTEXT, SERVER_MAX_BITS, CLIENT_MAX_BITS)


@dataclass(frozen=True, slots=True)
class Flavor:
    """One of the two extensions: its name, its preset dictionary, and whether a message
    is sent as a closed deflate stream (Nitro's) or a sync flush with its tail cut (RFC's)."""

    name: str
    zdict: bytes
    closed: bool

    def compress(self, data: bytes) -> bytes:
        if self.zdict:
            c = zlib.compressobj(LEVEL, zlib.DEFLATED, -15, zdict=self.zdict)
        else:
            c = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
        if self.closed:
            return c.compress(data) + c.flush(zlib.Z_FINISH)
        out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4] if out.endswith(TAIL) else out

    def decompressor(self) -> zlib._Decompress:
        if self.zdict:
            return zlib.decompressobj(-15, zdict=self.zdict)
        return zlib.decompressobj(-15)


NITRO = Flavor(NITRO_EXTENSION, FEED_DICTIONARY, closed=True)
STANDARD = Flavor(STANDARD_EXTENSION, b"", closed=False)
FLAVORS = (NITRO, STANDARD)


class SharedDeflate:
    """Each distinct message's compressed bytes, made once per flavor and kept while the
    messages and their compressed copies come to at most ``max_bytes`` (the oldest go
    first): every client of an endpoint gets the same bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._cache: dict[str, OrderedDict[bytes, bytes]] = {f.name: OrderedDict() for f in FLAVORS}
        self._bytes = 0
        self.compressed = 0  # messages compressed (not served from the cache)

    def get(self, flavor: Flavor, data: bytes) -> bytes:
        cache = self._cache[flavor.name]
        out = cache.get(data)
        if out is None:
            out = cache[data] = flavor.compress(data)
            self.compressed += 1
            self._bytes += len(data) + len(out)
            for c in (cache, *self._cache.values()):
                while self._bytes > self.max_bytes and c:
                    key, value = c.popitem(last=False)
                    self._bytes -= len(key) + len(value)
        return out


def parse_params(params: Sequence[ExtensionParameter]) -> dict[str, str | None]:
    """The parameters of one offer or answer; ``NegotiationError`` for one unknown,
    repeated or with a value it cannot have (as gobwas ``Parameters.Parse``)."""
    seen: dict[str, str | None] = {}
    for name, value in params:
        if name not in _PARAMS:
            raise NegotiationError(f"unexpected parameter {name}")
        if name in seen:
            raise NegotiationError(f"duplicate parameter {name}")
        if name in (SERVER_NO_CONTEXT, CLIENT_NO_CONTEXT) and value is not None:
            raise NegotiationError(f"{name} takes no value")
        if name == SERVER_MAX_BITS and value is None:
            raise NegotiationError(f"{name} needs a value")
        if value is not None and name != SERVER_NO_CONTEXT and name != CLIENT_NO_CONTEXT:
            if not value.isdigit() or not 8 <= int(value) <= 15:
                raise NegotiationError(f"{name}={value}: expected 8 to 15")
        seen[name] = value
    return seen


class FeedDeflate(Extension):
    """One connection's side of the extension: no context kept either way. ``shared``
    (server side): where its messages' compressed bytes come from; None (client side):
    it sends every message plain."""

    def __init__(self, flavor: Flavor, shared: SharedDeflate | None) -> None:
        self.flavor = flavor
        self.name = ExtensionName(flavor.name)
        self.shared = shared
        self._decoder: zlib._Decompress | None = None
        self._encoding = False  # the message being sent is compressed (continuations too)

    def __repr__(self) -> str:
        return f"FeedDeflate({self.flavor.name})"

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        if frame.opcode in CTRL_OPCODES:
            return frame
        if frame.opcode is CONT:
            if self._decoder is None:
                return frame
            if frame.rsv1:
                raise ProtocolError("RSV1 bit set in continuation frame")
        else:
            if not frame.rsv1:
                return frame
            self._decoder = self.flavor.decompressor()
        decoder = self._decoder
        assert decoder is not None
        data = bytes(frame.data) + TAIL if frame.fin else frame.data
        try:
            out = decoder.decompress(data, 0 if max_size is None else max_size + 1)
        except zlib.error as exc:
            raise ProtocolError("decompression failed") from exc
        if decoder.unconsumed_tail or (max_size is not None and len(out) > max_size):
            raise PayloadTooBig(None, max_size)
        if frame.fin:
            self._decoder = None
        return Frame(frame.opcode, out, frame.fin, False, frame.rsv2, frame.rsv3)

    def encode(self, frame: Frame) -> Frame:
        if frame.opcode in CTRL_OPCODES or self.shared is None:
            return frame
        if frame.opcode is CONT:
            if self._encoding:
                raise ProtocolError("a compressed message is sent whole, never in fragments")
            return frame
        if not frame.fin:
            # A fragmented message goes plain (RSV1 clear): each is compressed whole.
            return frame
        data = self.shared.get(self.flavor, bytes(frame.data))
        return Frame(frame.opcode, data, True, True, frame.rsv2, frame.rsv3)


def _compressing(accepted: Sequence[Extension]) -> bool:
    return any(e.name in (NITRO_EXTENSION, STANDARD_EXTENSION) for e in accepted)


class FeedDeflateFactory(ServerExtensionFactory):
    """The server side of ``flavor``: accepts an offer as gobwas ``wsflate.Extension.
    Negotiate`` does with ``DefaultParameters`` (the first offer of the name; one asking
    for a server window declined) and answers both ``no_context_takeover`` parameters."""

    def __init__(self, flavor: Flavor, shared: SharedDeflate) -> None:
        self.flavor = flavor
        self.name = ExtensionName(flavor.name)
        self.shared = shared

    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], Extension]:
        if _compressing(accepted_extensions):
            raise NegotiationError("a compression extension is agreed already")
        offer = parse_params(params)
        if SERVER_MAX_BITS in offer:
            raise NegotiationError("a server window size is not offered")
        answer: list[ExtensionParameter] = [(SERVER_NO_CONTEXT, None), (CLIENT_NO_CONTEXT, None)]
        return answer, FeedDeflate(self.flavor, self.shared)


class FeedDeflateClientFactory(ClientExtensionFactory):
    """The client side of ``flavor``: offers what Nitro's client offers (both
    ``no_context_takeover`` parameters), and takes an answer that keeps the server's
    context off (a window size the server names is within the one it decodes with)."""

    def __init__(self, flavor: Flavor) -> None:
        self.flavor = flavor
        self.name = ExtensionName(flavor.name)

    def get_request_params(self) -> Sequence[ExtensionParameter]:
        return [(SERVER_NO_CONTEXT, None), (CLIENT_NO_CONTEXT, None)]

    def process_response_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> Extension:
        if _compressing(accepted_extensions):
            raise NegotiationError("a compression extension is agreed already")
        answer = parse_params(params)
        if SERVER_NO_CONTEXT not in answer:
            raise NegotiationError("the server keeps its context, which was offered off")
        return FeedDeflate(self.flavor, None)


def server_extensions(shared: SharedDeflate) -> list[ServerExtensionFactory]:
    """An endpoint's extensions: Nitro's, then the standard one."""
    return [FeedDeflateFactory(f, shared) for f in FLAVORS]


def client_extensions() -> list[ClientExtensionFactory]:
    """What a feed client offers, in order of preference: Nitro's, then the standard one
    (a server that knows neither answers plain)."""
    return [FeedDeflateClientFactory(f) for f in FLAVORS]
