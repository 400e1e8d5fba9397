"""The `kiln` command's process-wide setup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"


def test_a_native_crash_after_a_command_prints_the_python_stack() -> None:
    # os.abort() stands in for a C++ library calling std::terminate: both raise SIGABRT.
    code = "import os\nfrom kiln.cli import main\nmain(['configs'])\nos.abort()\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(SRC), "PYTHONFAULTHANDLER": ""},
    )
    assert done.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in done.stderr
    assert 'File "<string>", line 4' in done.stderr
