"""A node's worker processes as one member of the relay tree (``serve --workers N``).

One worker, the feeder (index 0), follows the chain from the upstreams as a node of one
process does, and publishes every block it fetched as a signed frame; the other workers
are its children in the tree: their heads and blocks come from its frames (their block
followers take each block from the frame, with no upstream call, and warm their caches
with it), and they keep the upstreams for their own misses and forwarded calls. The
upstreams see one head tracker and one block follower per node, whatever N.

``SiblingFeed`` is what the supervisor makes once, before it forks the workers, and what
every worker, a restarted one too, inherits:

- the private listener: a Unix socket in a directory of its own (mode 0700: only the
  node's user reaches it), bound and listening in the supervisor, so it outlives a feeder
  that dies. The other workers' links to it wait in its backlog while the supervisor
  restarts the feeder, and are taken as soon as the new feeder serves. The feeder serves
  only the feed there; the public port, shared by every worker with SO_REUSEPORT, could
  land a link on any of them. The supervisor removes the directory when it stops.
- an ephemeral signing key, for a node that is no origin of its own: the feeder signs its
  frames with it and the other workers trust its address; nothing outside the node sees
  those frames (such a node serves no feed on its public port).
- the ``SharedHead`` (``chain.sharedhead``): the feeder's head, when an upstream last
  confirmed it, and its finality, so the other workers neither poll an upstream to keep
  their heads fresh nor ask one for finality while the feeder does.

Who signs what the feeder publishes (``origin_signer``): the node's own origin key when
its config names one (the feeder is then the node's origin, and every worker serves the
same signed frames to the node's tree children); else the ephemeral key, unless the node
has tree parents: a relay's or leaf's feeder passes on its parents' frames, signed by
their origins, which the other workers trust as the config says.
"""

from __future__ import annotations

import multiprocessing
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import coincurve

from chainrelay import defaults
from chainrelay.chain.sharedhead import SLOTS, SharedHead
from chainrelay.config import TreeConfig
from chainrelay.tree.frame import Signer
from chainrelay.tree.origin import load_signer

# The index of the feeder among a node's workers.
FEEDER = 0
# The feeder as the other workers' parent: its link's name in logs, and the handshake's URL
# (the connection itself goes to the Unix socket).
FEEDER_NAME = "feeder"
FEEDER_URL = "ws://localhost/feed"
_SOCKET_NAME = "feed.sock"


@dataclass
class SiblingFeed:
    directory: Path
    listener: socket.socket | None  # bound and listening; None in a worker that closed it
    key: bytes  # the ephemeral origin key (see ``origin_signer``)
    head: SharedHead

    @classmethod
    def create(cls, backlog: int = defaults.WORKER_FEED_BACKLOG) -> SiblingFeed:
        """A private listener, a key and a shared head, for workers forked after this."""
        directory = Path(tempfile.mkdtemp(prefix="chainrelay-feed-"))  # mode 0700
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(directory / _SOCKET_NAME))
            listener.listen(backlog)
        except OSError:
            listener.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        cells = multiprocessing.get_context("fork").RawArray("d", SLOTS)
        return cls(directory, listener, coincurve.PrivateKey().secret, SharedHead(cells))

    @property
    def path(self) -> str:
        """The private listener's socket path."""
        return str(self.directory / _SOCKET_NAME)

    def drop_listener(self) -> None:
        """Close this process's copy of the listener (a worker that does not serve it)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def close(self) -> None:
        """The supervisor, stopping: the listener closed, its directory removed."""
        self.drop_listener()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class WorkerRole:
    """A worker's place among its node's workers."""

    index: int
    feed: SiblingFeed

    @property
    def feeder(self) -> bool:
        return self.index == FEEDER


def origin_signer(tree: TreeConfig, feed: SiblingFeed) -> Signer | None:
    """Who signs the blocks the feeder publishes (see the module's docstring); None: the
    feeder publishes none of its own."""
    signer = load_signer(tree)
    if signer is not None:
        return signer
    if tree.parents:
        return None
    return Signer(feed.key)
