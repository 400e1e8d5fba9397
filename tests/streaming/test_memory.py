"""Resident-set measurement: the peak window resets and sees a large allocation."""

from __future__ import annotations

import sys

import pytest
import torch

from kiln.streaming.memory import current_rss, peak_rss, reset_peak


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_window_sees_an_allocation_and_resets() -> None:
    reset_peak()
    base = current_rss()
    block = torch.ones(64 << 18)  # 64 MiB, touched
    assert peak_rss() >= base + (60 << 20)
    del block
    reset_peak()
    assert peak_rss() < base + (30 << 20)
