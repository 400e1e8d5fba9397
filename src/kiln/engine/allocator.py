"""glibc malloc tuning for workloads that allocate and free very large tensors every step.

By default glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap``
calls and returns them on free, so every 100 MB temporary of a full-size lattice step is faulted
in page by page again. Keeping large blocks on the heap (``M_MMAP_MAX = 0``) and never trimming
it (a high ``M_TRIM_THRESHOLD``) lets the next step reuse the same pages. The price: resident
memory stays at its peak instead of shrinking between steps. It changes no computed value.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30  # give memory back only when 1 GiB lies free at the top of the heap


def keep_freed_memory() -> bool:
    """Tell glibc to keep large blocks on the heap for reuse; False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
