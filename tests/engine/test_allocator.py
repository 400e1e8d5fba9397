"""The glibc allocator tuning: applied where glibc is, harmless to repeat, no effect on values.

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


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)
def test_glibc_accepts_the_tuning_and_values_are_unchanged() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]
