"""glibc malloc tuning for workloads that allocate and free very large tensors every step.

Two opposite needs, one per workload:

- Speed (``keep_freed_memory``). By default glibc serves blocks above its mmap threshold (at
  most 32 MiB) with fresh ``mmap`` calls and returns them on free, so every 100 MB temporary of
  a full-size lattice step is faulted in page by page again. Keeping large blocks on the heap
  (``M_MMAP_MAX = 0``) and never trimming it (``M_TRIM_THRESHOLD = -1``) lets the next step
  reuse the same pages; resident memory then stays at its peak. Any finite trim threshold
  falls short: a step that frees more than the threshold at once (3.5 GB for the full lattice
  at batch 8) hands the pages back, and the next step faults them in again.
- A bounded resident set (``map_large_allocations``, ``release_free_memory``). Streaming needs
  freed chunk-sized blocks to leave the resident set at once, so they get their own mappings and
  the heap is trimmed between chunks.

Both hold for the whole process, change no computed value, and do nothing where libc is not
glibc (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_NEVER_TRIM = -1  # M_TRIM_THRESHOLD -1: trimming off (mallopt(3))
_MAP_FROM = 1 << 20  # streaming: blocks from 1 MiB get their own mapping


def _glibc() -> ctypes.CDLL | None:
    """The C library when it has glibc's malloc tuning calls, else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Tell glibc to keep large blocks on the heap for reuse; False where that is not possible."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    )


def map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more (gradients, optimizer state) with its own mapping.

    glibc otherwise raises its mmap threshold after a large free (up to 32 MiB) and serves later
    chunk-sized blocks from a heap whose freed pages stay resident, pinned by small blocks in
    between, so a streamed step's resident set grows with the number of chunks. The price is a
    page fault per fresh page of those blocks: small for streamed steps (few tokens), large for
    big activations, so resident-mode streaming steps do not set it.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MAP_FROM)


def release_free_memory() -> None:
    """Return freed heap pages to the kernel (malloc_trim), so the resident set shows live data."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
