"""Resident-set measurement on Linux (the process's peak RSS within a window) and chunk buffers.

``reset_peak`` zeroes the kernel's high-water mark (``/proc/self/clear_refs`` value 5), so
``peak_rss`` afterwards is the peak since the reset. Elsewhere both return 0 and the step
metrics carry the cache's own accounting only.
"""

from __future__ import annotations

import contextlib
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


def mapped_empty(nbytes: int) -> torch.Tensor:
    """A uint8 tensor in its own anonymous mapping, returned to the kernel when it is freed.

    Chunk buffers live here rather than on the malloc heap, whatever glibc's mmap threshold is
    (see ``kiln.engine.allocator``), so an evicted chunk leaves the resident set at once.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
