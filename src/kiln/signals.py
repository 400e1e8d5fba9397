"""Graceful stops: SIGINT/SIGTERM ask a training loop to stop at the next step boundary.

Both loops (the gradient trainer and the hashtron loop) run inside ``StopSignals``: a signal
only sets ``received``; the loop checks it between steps, checkpoints, marks the run
``interrupted`` and returns (the CLI then exits 130). A second signal raises
``KeyboardInterrupt`` at once, for a user who does not want to wait for the step to finish.
"""

from __future__ import annotations

import contextlib
import signal
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a stop request while it is active."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            # Outside the main thread signal() raises ValueError: the caller owns signals.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._request_stop)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
