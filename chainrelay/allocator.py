"""Freed memory given back to the kernel once a burst of big buffers is over.

glibc's malloc serves a block above its mmap threshold (128 KiB at start) with a mapping
of its own, unmapped when freed; but each time such a block is freed it raises the
threshold to that block's size (up to 32 MiB). After a client's 5 MiB body is freed, later
blocks up to that size come from the heap, where freed memory stays resident until the
heap's top is free: an attack of unfinished bodies left a node 160 MiB above where it
started long after its connections were gone. Fixing the threshold (``mallopt``) would
give each block back at once, but would map and unmap every large answer written (a
200 KiB block answer: 135 us instead of 4); so the heap is trimmed instead, once the front
door has let go of a burst (``malloc_trim`` returns the free pages anywhere in the heap,
not only at its top). Elsewhere than glibc (musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_looked = False


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _looked
    if not _looked:
        _looked = True
        try:
            fn = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
        except (OSError, AttributeError):
            return None
        fn.argtypes = (ctypes.c_size_t,)
        fn.restype = ctypes.c_int
        _trim = fn
    return _trim


def give_back_freed_memory() -> bool:
    """Return the heap's free pages to the kernel; False where the C library has no
    ``malloc_trim`` (it is not glibc). Costs a walk of the heap: a few milliseconds for
    hundreds of MiB, so it is called after a burst, not per request."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
