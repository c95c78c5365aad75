"""Process memory: decoded images are large and short-lived; this makes their buffers go back to the OS when freed.

glibc serves an allocation from the heap unless it is above the mmap threshold, and raises that threshold (up to
32 MiB) each time a large mmapped block is freed. Pillow allocates image rows in 16 MiB blocks, so after the first
large image every later one came from the heap, and a heap fragmented by a burst of 40 MP images kept the worker's
RSS gigabytes high after the burst. A fixed threshold below Pillow's block size keeps those blocks mmapped:
freed, they are unmapped at once."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def return_large_buffers_to_the_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (also ends its dynamic raising). False where the C library
    is not glibc (nothing changes there)."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    log.info("malloc mmap threshold fixed at %d bytes: %s", threshold, ok)
    return ok


def trim() -> None:
    """Hand freed heap memory back to the OS (after a large batch: its small allocations fragment the heap too)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
