"""The glibc allocator tuning: applied where glibc is, harmless to repeat, no effect on values."""

from __future__ import annotations

import platform

import pytest
import torch

from kiln.engine.allocator import keep_freed_memory


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)
def test_glibc_accepts_the_tuning_and_values_are_unchanged() -> None:
    torch.manual_seed(0)
    a = torch.randn(4096, 1024)  # 16 MiB blocks, the kind the tuning keeps on the heap
    before = (a @ a.T).sum()
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    after = (a @ a.T).sum()
    assert torch.equal(before, after)
