"""Heap settings for the processes evalfabric owns (``fabric node`` and the CLI's commands).

Moving an artifact allocates a buffer of about a chunk (1 MiB) per frame on each
side, and frees it a moment later.  glibc's defaults give such memory back to
the kernel as soon as a few MiB are free at the top of the heap, and serve
buffers over its mmap threshold with fresh mappings, so nearly every chunk's
buffer is faulted in page by page again: on a VM that costs more than copying
it.  :func:`keep_freed_memory` keeps up to :data:`TRIM_THRESHOLD_BYTES` of freed
heap for reuse and takes buffers below :data:`MMAP_THRESHOLD_BYTES` from the
heap.  It changes the whole process, so only entry points that own their
process call it; importing evalfabric as a library never does.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["keep_freed_memory", "TRIM_THRESHOLD_BYTES", "MMAP_THRESHOLD_BYTES"]

#: Freed memory at the top of the heap kept for reuse rather than returned to the kernel.
TRIM_THRESHOLD_BYTES = 64 << 20
#: Allocations at least this large get their own mapping (a whole artifact); smaller ones come from the heap.
MMAP_THRESHOLD_BYTES = 32 << 20

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set the heap thresholds above in this process (glibc only); True when they are in force.

    Idempotent.  Elsewhere (musl, macOS, Windows) it changes nothing and returns False.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return _applied


def _mallopt(param: int, value: int) -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the interpreter's own libc (no library search: ~20 ms)
        return mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
    except (OSError, AttributeError):
        return False
