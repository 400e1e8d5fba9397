"""The progress bar appears only on a terminal and when enabled."""

from __future__ import annotations

import io
import sys

import pytest

from kiln.engine.progress import ProgressDisplay


def test_inactive_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    display = ProgressDisplay(10, 0, enabled=True)
    assert not display.active
    with display:
        display.update(1, 2.5, 1000.0)
    assert sys.stderr.getvalue() == ""


def test_active_on_a_terminal_shows_step_loss_and_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not ProgressDisplay(10, 0, enabled=False).active
    display = ProgressDisplay(10, 3, enabled=True)
    assert display.active
    with display:
        display.update(4, 2.5, 1234.0)
    bar = display._bar
    assert bar is not None
    task = bar.tasks[0]
    assert (task.completed, task.total) == (4, 10)
    assert task.fields == {"loss": "2.5000", "tps": "1,234"}
