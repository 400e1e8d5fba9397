"""Memory in use, and detection of spikes worth a log line."""

from __future__ import annotations

import os
import resource

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_in_use(device: torch.device) -> int:
    """Bytes in use: CUDA allocator bytes on a GPU, else the process's resident set size."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the peak, the best the OS offers
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_report(device: torch.device) -> str:
    """One line describing the memory state, for logs after an out-of-memory error."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (
            f"cuda allocated {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB, "
            f"reserved {torch.cuda.memory_reserved(device) / 2**20:.0f} MiB, "
            f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB, "
            f"free {free / 2**20:.0f} of {total / 2**20:.0f} MiB"
        )
    return f"resident {memory_in_use(device) / 2**20:.0f} MiB"


class SpikeDetector:
    """Flags a reading above ``ratio`` x the running peak of earlier readings."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.peak = 0

    def observe(self, in_use: int) -> bool:
        """Record a reading; True if it is a spike relative to the peak before it."""
        spike = self.peak > 0 and in_use > self.ratio * self.peak
        self.peak = max(self.peak, in_use)
        return spike
