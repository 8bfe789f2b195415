"""Every error chainrelay raises, in one tree.

::

    ChainRelayError
    ├── ConfigError                      a config file or flag is wrong (names the key path)
    ├── StopFailed                       stops that failed, as one ExceptionGroup (every stop ran)
    ├── RequestError                     the caller's request is wrong; maps to a JSON-RPC code
    │   ├── ParseError                   -32700  body is not JSON
    │   ├── InvalidRequest               -32600  not a JSON-RPC 2.0 request object
    │   │   └── BatchTooLarge            -32600  batch longer than the configured limit
    │   ├── MethodNotFound               -32601  method refused by this node
    │   ├── InvalidParams                -32602  params of the wrong shape for the method
    │   ├── FilterNotFound               -32000  filter id never installed, uninstalled or expired
    │   ├── PendingUnavailable           -32000  no upstream streams pending transactions
    │   ├── LimitExceeded                -32005  subscriptions per connection, address or node
    │   │   ├── TooManyFilters           -32005  filters per node or per client address
    │   │   ├── FilterOverflowed         -32005  a filter's changes overflowed between two polls
    │   │   └── RateLimited              -32005  an identity's calls past its tier's rate (429)
    │   └── BatchRefused                 -32040..-32047  a batch push refused (ingress)
    ├── InternalError                    -32603  a bug in this node; never the caller's fault
    ├── BackfillFailed                   a feed subscriber could not fill a gap over JSON-RPC
    ├── BatchLogError                    the durable batch log did not take a record (push again)
    ├── PublishError                     a publisher's batch was not acknowledged (gave up, closed)
    │   ├── PublishRefused               -32040..-32047  an ingress node refused the batch
    │   └── PublishUnauthorized          an ingress node refused the API key (HTTP 401)
    └── UpstreamError                    -32000 range; carries upstream, method, attempts
        ├── UpstreamUnavailable          -32001  no healthy upstream could answer
        │   └── NoUpstreamInRotation     -32001  none in rotation: refused at once, no try made
        ├── UpstreamTimeout              -32002  the call's deadline passed (or every try timed out)
        ├── UpstreamWrongChain           refused at start: the upstream serves another chain
        └── UpstreamOverloaded           -32005  calls in flight or upstream budgets at their bound

A JSON-RPC error that an upstream node *answered* (``execution reverted`` and the like) is
not an exception here: it is the node's real answer and passes through unchanged.
"""

from __future__ import annotations


class ChainRelayError(Exception):
    """Root of every error raised by chainrelay."""


class ConfigError(ChainRelayError):
    """A configuration file or command-line option is invalid."""


class StopFailed(ChainRelayError, ExceptionGroup):
    """Stopping a node's capabilities raised; ``exceptions`` holds every failure, in the
    order the stops ran (every stop ran, whatever the others raised)."""

    def __str__(self) -> str:
        # What the command line prints: every failure, not only how many there were.
        return f"{self.message}: {list(self.exceptions)!r}"


class RequestError(ChainRelayError):
    """The caller sent something this node cannot serve; ``code`` is the JSON-RPC code."""

    code = -32600

    def __init__(self, message: str, data: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class ParseError(RequestError):
    code = -32700


class InvalidRequest(RequestError):
    code = -32600


class BatchTooLarge(InvalidRequest):
    pass


class MethodNotFound(RequestError):
    code = -32601


class InvalidParams(RequestError):
    code = -32602


class FilterNotFound(RequestError):
    """geth's answer, code and message alike, so clients that reinstall on it keep working."""

    code = -32000


class SubscriptionNotFound(RequestError):
    """eth_unsubscribe of an id this connection does not hold: geth's -32000 "subscription
    not found" (BSC runs geth; anvil answers false instead)."""

    code = -32000


class PendingUnavailable(RequestError):
    """Pending transactions were asked for, and no upstream of this node can stream them
    (only a WebSocket upstream can): said at once, not as a filter that never yields."""

    code = -32000


class LimitExceeded(RequestError):
    """A limit of this node is reached (subscriptions per connection, per IP, per node).

    -32005 is the code providers answer for "limit exceeded"; the caller may retry later."""

    code = -32005


class TooManyFilters(LimitExceeded):
    """Installed filters (eth_newFilter & co) of the whole node, or of one client address."""


class FilterOverflowed(LimitExceeded):
    """A filter's buffer of changes filled up between two polls: what did not fit was not
    kept, so the poll is refused (and the filter removed) rather than answered incomplete."""


class RateLimited(LimitExceeded):
    """A request past its identity's rate (access/buckets.py), refused whole before any of
    its calls is served: ``answer`` is its JSON-RPC answer (-32005, the wait in ``data``),
    which a WebSocket sends as is and HTTP sends with 429 and ``Retry-After``."""

    def __init__(self, retry_after: float, answer: bytes) -> None:
        super().__init__("limit exceeded")
        self.retry_after = retry_after  # seconds; math.inf: the request costs more than a burst
        self.answer = answer


class BatchRefused(RequestError):
    """A batch push this ingress node refuses; ``code`` names why (batches/ingress.py:
    -32040 gap, -32041 conflict, -32042 signer, -32043 signature, -32044 too large, -32045
    unknown stream, -32046 not held by enough relays, -32047 not durable)."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(message, data)
        self.code = code


class InternalError(ChainRelayError):
    code = -32603


class BackfillFailed(ChainRelayError):
    """Blocks a feed subscriber lacks and no parent's JSON-RPC endpoint gave: the
    subscription ends here rather than hand its consumer a gap."""


class BatchLogError(ChainRelayError):
    """A batch the durable log did not commit: its transaction failed, the log is closed, or
    its seq does not follow the stream's last one in the log. Nothing of it was written."""


class PublishError(ChainRelayError):
    """A batch the publisher could not get acknowledged: no ingress node reachable for its
    give-up time, the publisher closed, or refused (the subclasses)."""


class PublishRefused(PublishError):
    """An ingress node's refusal of a pushed batch or confirmation, as it answered it:
    ``code`` (-32040 gap, -32041 conflict, -32042 signer, -32044 too large, -32045 unknown
    stream, ...), ``message``, ``data`` (``expected``, ``signer``, ``limit``)."""

    def __init__(
        self, code: int, message: str, data: object = None, *, url: str = "", seq: int = -1
    ) -> None:
        super().__init__(f"{url or 'ingress'} refused batch {seq}: {message} ({code}) {data or ''}")
        self.code = code
        self.message = message
        self.data = data
        self.url = url
        self.seq = seq


class PublishUnauthorized(PublishError):
    """An ingress node refused the API key at the upgrade: retrying cannot help."""


class UpstreamError(ChainRelayError):
    """No upstream gave an answer; carries which upstream, which method, how many attempts."""

    code = -32000

    def __init__(
        self,
        message: str,
        *,
        method: str = "",
        upstream: str = "",
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.upstream = upstream
        self.attempts = attempts

    def __str__(self) -> str:
        return (
            f"{self.message} (method={self.method or '-'}, upstream={self.upstream or '-'}, "
            f"attempts={self.attempts})"
        )


class UpstreamUnavailable(UpstreamError):
    code = -32001


class NoUpstreamInRotation(UpstreamUnavailable):
    """Every upstream is out of rotation (errors in a row, until a probe brings one back):
    the call is refused at once rather than sent to an upstream known to fail and left to
    wait out its deadline."""


class UpstreamTimeout(UpstreamError):
    code = -32002


class UpstreamWrongChain(UpstreamError):
    code = -32003


class UpstreamOverloaded(UpstreamError):
    """The node's upstream calls in flight are at their bound (node-wide, or the caller's
    own past its wait), or every upstream that could answer stayed at its budget
    (``max_rps``, ``max_concurrency``) past ``[pool] budget_wait``: shed. -32005, the
    code providers answer for "limit exceeded": the caller may retry later. An
    ``UpstreamError`` so that every caller waiting on the same answer (coalesced calls)
    gets it as such."""

    code = -32005


def error_code(exc: BaseException) -> int:
    """The one place an exception becomes a JSON-RPC error code."""
    if isinstance(exc, RequestError | UpstreamError | InternalError):
        return exc.code
    return InternalError.code


def error_message(exc: BaseException) -> str:
    if isinstance(exc, RequestError | UpstreamError):
        return exc.message
    return "internal error"
