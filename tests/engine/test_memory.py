"""Memory readings and spike detection."""

from __future__ import annotations

import torch

from kiln.engine.memory import SpikeDetector, memory_in_use, memory_report


def test_spike_is_relative_to_the_earlier_peak() -> None:
    detector = SpikeDetector(ratio=1.5)
    assert [detector.observe(v) for v in (100, 120, 170, 200, 301, 290)] == [
        False, False, False, False, True, False,
    ]
    assert detector.peak == 301


def test_cpu_memory_reading_is_plausible() -> None:
    cpu = torch.device("cpu")
    before = memory_in_use(cpu)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = memory_in_use(cpu)
    assert before > 10 * 2**20
    assert after - before > 32 * 2**20
    assert "resident" in memory_report(cpu)
    del block
