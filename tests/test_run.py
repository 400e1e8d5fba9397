"""The run directory: one trainer at a time, and a crashed trainer never keeps the run locked."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from kiln import workflows
from kiln.config import Config
from kiln.errors import RunError
from kiln.run import LOCK, Run

HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from kiln.run import Run
run = Run.open(Path(sys.argv[1]), echo=False)
run.claim()
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_run_in_training_cannot_be_resumed_beside_it(
    smoke_config: Callable[..., Config],
) -> None:
    run = Run.create(smoke_config(), echo=False)  # holds the lock, as `kiln train` does
    run.set_status("interrupted")
    with pytest.raises(RunError, match=r"in use by another kiln process \(pid \d+\)"):
        workflows.resume(run.path, echo=False)
    run.close()
    Run.open(run.path, echo=False).claim()  # released by close


def test_a_killed_trainer_leaves_the_run_resumable(smoke_config: Callable[..., Config]) -> None:
    created = Run.create(smoke_config(), echo=False)
    created.close()
    path = created.path
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert (path / LOCK).read_text().strip() == str(holder.pid)
        with pytest.raises(RunError, match=f"pid {holder.pid}"):
            Run.open(path, echo=False).claim()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process
        try:
            Run.open(path, echo=False).claim()
            break
        except RunError:
            assert time.monotonic() < deadline, "the lock outlived its process"
            time.sleep(0.05)
