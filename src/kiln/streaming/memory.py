"""Resident-set measurement on Linux: the process's peak RSS within a window, and freeing.

``reset_peak`` zeroes the kernel's high-water mark (``/proc/self/clear_refs`` value 5), so
``peak_rss`` afterwards is the peak since the reset. Elsewhere both return 0 and the step
metrics carry the cache's own accounting only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def current_rss() -> int:
    """Bytes resident now."""
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak resident bytes since the last ``reset_peak`` (or process start)."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> None:
    """Start a new peak-RSS window."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def mapped_empty(nbytes: int) -> torch.Tensor:
    """A uint8 tensor in its own anonymous mapping, returned to the kernel when it is freed.

    Chunk buffers live here rather than on the malloc heap, whatever glibc's mmap threshold is
    (see ``map_large_allocations``), so an evicted chunk leaves the resident set at once.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


_M_MMAP_THRESHOLD = -3


def map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more (gradients, optimizer state) with its own mapping.

    glibc otherwise raises its mmap threshold after a large free (up to 32 MiB) and serves later
    chunk-sized blocks from a heap whose freed pages stay resident, pinned by small blocks in
    between, so a streamed step's resident set grows with the number of chunks. The price is a
    page fault per fresh page of those blocks, small for streamed steps (few tokens) but large
    for big activations: resident-mode steps do not set it. It holds for the whole process.
    """
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def release_free_memory() -> None:
    """Return freed heap pages to the kernel (glibc malloc_trim), so RSS shows live memory."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
