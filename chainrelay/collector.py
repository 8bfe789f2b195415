"""What a node builds while it starts is kept out of the cyclic garbage collector's reach.

A collection of the oldest generation walks every object the process holds. Right after
start that is some 80,000 objects (modules, classes, the parsed config, the composed
services), which live as long as the node; walking them took 40 to 90 ms on a 2-core
machine, and a burst of clients that made the collector run felt it as one stall of that
length in their tail. Once the node serves, the garbage of starting is collected and what
is left is moved to the permanent generation (``gc.freeze``), which no collection walks:
a full collection then walks only what the node made since (cached answers, connections).

The young collections are made shorter and the full ones rarer (``GC_THRESHOLDS``): a
block of a busy chain is decoded, cached and held a slice at a time, so its tens of
thousands of objects stay alive across many young collections, and the middle generation
collected every tenth young collection walked them all at once: up to 7-15 ms, over 2 ms in
half of them, the largest of a node's own stalls while it follows such a chain.

Called by the processes that serve (``chainrelay serve``, each worker, ``chainrelay
devnet``), never by a library user's process: freezing someone else's heap would keep
their later garbage cycles forever.
"""

from __future__ import annotations

import gc

from chainrelay import defaults


def settle_startup_heap() -> None:
    """Collect what starting left behind, freeze what is left in place, and set the
    serving process's collection thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*defaults.GC_THRESHOLDS)
