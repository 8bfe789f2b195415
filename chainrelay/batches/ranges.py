"""Batch frames by seq, wherever they still are: ``GET /feed/range`` on every node.

A subscriber that resumes from a seq its relay's backlog no longer holds, and a relay
whose parents both lack a batch, ask a node for ``stream`` from ``from`` on. The node
answers from its backlog when it holds that seq, else from its durable log (an ingress
node), else asks its parents the same and passes their answer on: requests climb the tree
until a node has the batches, as JSON-RPC misses do. Frames carry the sequencer's
signature, so the asker checks each one itself and no node on the way needs trusting.

The answer is frames back to back (``batchframe.encode_range``), consecutive seqs from
``from``, at most ``limit`` frames (``range_max_frames``) and about ``range_max_bytes``;
empty when nothing is there yet. Requests passed to parents carry Via, and one that comes
back to a node it passed is refused (508), as for JSON-RPC.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp
import orjson

from chainrelay.batches.frame import decode_range, encode_range, parse_range_query
from chainrelay.batches.log import BatchLog
from chainrelay.config import BatchesConfig
from chainrelay.server.http import RANGE_PATH, Reply
from chainrelay.server.peer import relays_in
from chainrelay.tree.frame import FrameError
from chainrelay.tree.hub import FeedHub
from chainrelay.tree.streams import BatchStream

log = logging.getLogger(__name__)

OCTETS = b"application/octet-stream"
JSON = b"application/json"


class BatchRange:
    """Serves range requests and fetches missing batches from the node's parents."""

    def __init__(
        self,
        hub: FeedHub,
        cfg: BatchesConfig,
        *,
        via: str,
        max_hops: int,
        max_frame_bytes: int,
        parents: Callable[[], list[str]],
        log_: BatchLog | None = None,
    ) -> None:
        """``parents()``: the parents' HTTP base URLs, the preferred first."""
        self.hub = hub
        self.cfg = cfg
        self.via = via
        self.max_hops = max_hops
        self.max_frame_bytes = max_frame_bytes
        self.parents = parents
        self.log = log_
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.range_timeout), trust_env=False
        )

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # --- serving ----------------------------------------------------------------------------
    async def serve(self, query: bytes, via: bytes | None) -> Reply:
        try:
            stream, start, limit = self._parse(query)
        except ValueError as exc:
            return 400, _json_error(str(exc)), JSON
        relays = relays_in(via or b"")
        if self.via.encode() in relays or len(relays) >= self.max_hops:
            return 508, _json_error("relay loop: this range request passed this node"), JSON
        max_bytes = self.cfg.range_max_bytes
        frames = self.hub.range(stream, start, limit, max_bytes)
        if frames is None and self.log is not None:
            frames = await self.log.frames(stream, start, limit, max_bytes)
            if not frames:
                last = await self.log.last_seq(stream)
                if last is not None and start <= last:
                    frames = None  # below the log's first batch: a parent may hold it
        if frames is not None:
            return 200, encode_range(frames), OCTETS
        body = await self._climb(stream, start, limit, [*relays, self.via.encode()])
        if body is None:
            return 404, _json_error(f"batch {start} of {stream} is held nowhere I can reach"), JSON
        return 200, body, OCTETS

    def _parse(self, query: bytes) -> tuple[str, int, int]:
        q = parse_range_query(query)
        if not isinstance(self.hub.streams.get(q.stream), BatchStream):
            raise ValueError(f"no batch stream {q.stream!r} here")
        most = self.cfg.range_max_frames
        return q.stream, q.start, min(q.limit or most, most)

    async def _climb(
        self, stream: str, start: int, limit: int, relays: list[bytes]
    ) -> bytes | None:
        """The first parent's answer holding ``start``; None if no parent has it."""
        headers = {"Via": ", ".join(f"1.1 {r.decode()}" for r in relays)}
        for base in self.parents():
            try:
                body = await self._get(base, stream, start, limit, headers)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                log.info("range %s@%d from %s failed: %s", stream, start, base, exc)
                continue
            if body is not None:
                return body
        return None

    async def _get(
        self, base: str, stream: str, start: int, limit: int, headers: dict[str, str]
    ) -> bytes | None:
        session = self._session
        assert session is not None
        url = f"{base.rstrip('/')}{RANGE_PATH.decode()}"
        params = {"stream": stream, "from": str(start), "limit": str(limit)}
        async with session.get(url, params=params, headers=headers) as resp:
            if resp.status != 200:
                return None
            cap = self.cfg.range_max_bytes + self.max_frame_bytes
            body = await resp.content.read(cap + 1)
            while len(body) <= cap and not resp.content.at_eof():
                more = await resp.content.read(cap + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > cap:
                raise ValueError(f"range answer past {cap} bytes")
            return body

    # --- a relay's own gaps (FeedHub.fetch_range) ------------------------------------------
    async def fetch(self, stream: str, start: int, end: int) -> list[bytes]:
        """Frames ``[start, end)`` of ``stream`` from the parents, as far as they go."""
        out: list[bytes] = []
        at = start
        headers = {"Via": f"1.1 {self.via}"}
        while at < end:
            got: list[bytes] = []
            for base in self.parents():
                try:
                    body = await self._get(
                        base, stream, at, min(end - at, self.cfg.range_max_frames), headers
                    )
                    got = decode_range(body or b"", self.max_frame_bytes)
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError, FrameError) as exc:
                    log.info("range %s@%d from %s failed: %s", stream, at, base, exc)
                    continue
                if got:
                    break
            if not got:
                break
            out.extend(got)
            at += len(got)
        return out[: end - start]


def _json_error(text: str) -> bytes:
    return orjson.dumps({"error": text})
