"""The progress bar: step, loss, tokens/s and ETA on a terminal; silent elsewhere."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressDisplay:
    """A rich progress bar shown only when enabled and stderr is a terminal."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool) -> None:
        self.active = enabled and sys.stderr.isatty()
        self._bar: Progress | None = None
        self._task = None
        if self.active:
            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._bar.add_task(
                "train", total=total_steps, completed=start_step, loss="-", tps="-"
            )

    def __enter__(self) -> ProgressDisplay:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, loss: float, tokens_per_sec: float) -> None:
        """Advance the bar to ``step``."""
        if self._bar is not None:
            self._bar.update(
                self._task, completed=step, loss=f"{loss:.4f}", tps=f"{tokens_per_sec:,.0f}"
            )
