"""The glibc allocator tuning: applied where glibc is, harmless to repeat, no effect on values,
and freed memory really stays for reuse.

The tuning is process-wide and cannot be undone, so it runs in a child process: other tests
measure resident memory and must see glibc's defaults.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = """
import torch
from kiln.engine.allocator import keep_freed_memory
torch.manual_seed(0)
a = torch.randn(4096, 1024)  # 16 MiB blocks, the kind the tuning keeps on the heap
before = (a @ a.T).sum()
first, again = keep_freed_memory(), keep_freed_memory()
after = (a @ a.T).sum()
print(first, again, torch.equal(before, after))
"""


# Steps that allocate and free 1.5 GiB of temporaries each, more than any finite trim threshold
# would keep: after a few steps the heap holds them all and a step faults in no new pages.
REUSE = """
import resource
import torch
from kiln.engine.allocator import keep_freed_memory
keep_freed_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    temporaries = [torch.ones(1 << 26) for _ in range(6)]  # 6 x 256 MiB, every page touched
    del temporaries
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""

needs_glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)


def _child(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@needs_glibc
def test_glibc_accepts_the_tuning_and_values_are_unchanged() -> None:
    assert _child(CHILD) == ["True", "True", "True"]


@needs_glibc
def test_steps_reuse_the_memory_earlier_steps_freed_instead_of_faulting_it_in() -> None:
    faults = [int(n) for n in _child(REUSE)]
    assert faults[0] > 0 and sum(faults[-3:]) < faults[0] / 10, faults
