"""What a try of an upstream can end in when it yields no usable answer.

``TransportError`` is retryable (another upstream, or the same one later); its flags say
whether it counts against the upstream's health. ``BatchUnsupported`` is a batch the
upstream would not answer as one. Kept apart from the transports (``upstream.py``,
``httplink.py``) so both raise the same errors without importing each other.
"""

from __future__ import annotations

# A relay's answer to a request whose Via names it (RFC 5842's 508 Loop Detected).
LOOP_DETECTED = 508


class TransportError(Exception):
    """The upstream gave no usable answer (timeout, refused, 5xx, 429, garbage): retryable."""

    def __init__(
        self,
        message: str,
        *,
        timeout: bool = False,
        malformed: bool = False,
        loop: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.timeout = timeout
        # The upstream answered, but not with JSON-RPC (or, ``loop``, refused a request that
        # had passed through it already: relays that are each other's upstreams). Retried
        # elsewhere, yet not counted against the upstream's health: one odd request must not
        # take every node out.
        self.malformed = malformed or loop
        self.loop = loop
        # A provider's "slow down" (HTTP 429), with the seconds its Retry-After asks for
        # (0.0 when it names none): the upstream is well, only busy; never counted against
        # its health either.
        self.retry_after = retry_after
        self.counts = not (self.malformed or retry_after is not None)


class BatchUnsupported(TransportError):
    """The upstream answered a batch with something else than an answer to each of its
    calls (an HTTP error status, an error object, an array missing ids): the calls are
    asked one by one. Not counted against the upstream's health: it answers, only not
    batches (or not batches this long)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, malformed=True)


def retry_after_seconds(header: str | bytes | None) -> float:
    """Seconds a Retry-After header asks for: delta-seconds, or 0.0 when absent or an
    HTTP date (rare from JSON-RPC providers; the 429 alone then says "slow down")."""
    if header is None:
        return 0.0
    try:
        seconds = float(header.strip())
    except ValueError:
        return 0.0
    return seconds if seconds > 0.0 else 0.0  # a NaN or a negative asks for nothing
