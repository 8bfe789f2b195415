"""How this process's allocator gives memory back: when it is freed, not when glibc decides.

glibc's malloc serves a block above its mmap threshold (128 KiB at start) with its own
mapping, unmapped when freed; but each time such a block is freed it raises the threshold
to that block's size (up to 32 MiB), and the trim threshold with it. After a client's
5 MiB body is freed, every later block up to 5 MiB comes from the heap, where freed memory
stays resident until the heap's top is free: an attack of unfinished bodies left a node
160 MiB above where it started long after its connections were gone. ``mallopt`` with
fixed thresholds turns that adjustment off, so big blocks (bodies, answers, frames) go
back to the kernel when freed. Elsewhere than glibc (musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks of this size and above get a mapping of their own, returned when freed: glibc's
# own starting value, only kept from growing. A read from a socket (up to 256 KiB), a body,
# a block's answer are above it; pymalloc's small objects and short answers are not.
MMAP_THRESHOLD = 128 * 1024
# Free memory at the heap's top above this is returned to the kernel: glibc's own
# starting value (twice the mmap threshold's), kept from growing.
TRIM_THRESHOLD = 256 * 1024


def return_memory_promptly() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where the C library
    has no ``mallopt`` (it is not glibc) or refused them."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
