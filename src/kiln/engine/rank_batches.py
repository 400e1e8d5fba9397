"""This rank's share of every step, and the optional log of the windows each rank trained.

Every rank draws the same global step batch from the job (the loader's cursor is global, and
the job normalises the loss weights over the whole step), then keeps its contiguous slice: rank
``r`` of ``W`` trains rows ``[r*B/W, (r+1)*B/W)``. The slices cover the step with no overlap and
no gap, and the order of the data does not depend on the world size, so a run resumes under
another one at the same global position.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kiln.config import Config
from kiln.data.loader import Batch
from kiln.engine.job import StepBatches, batch_size
from kiln.engine.placement import Local
from kiln.errors import ConfigError, DataError
from kiln.fsio import atomic_write, json_text
from kiln.run import Run

SAMPLES_DIR = "samples"


class SampleLog:
    """``samples/rank<r>.jsonl``: per step, the ``[source, window id]`` of each row trained."""

    def __init__(self, run_dir: Path, placement: Local) -> None:
        self.folder = run_dir / SAMPLES_DIR
        self.placement = placement
        self.step = 0
        self._file: Any = None

    def begin(self, step: int) -> None:
        """Continue after ``step``: rows of later steps (trained before a crash) are dropped."""
        if self.placement.is_main:
            self.folder.mkdir(exist_ok=True)
            for path in sorted(self.folder.glob("rank*.jsonl")):
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
                atomic_write(path, "".join(line + "\n" for line in kept))
        self.placement.barrier()
        self.step = step
        path = self.folder / f"rank{self.placement.rank}.jsonl"
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def record(self, windows: list[Any]) -> None:
        """Append the next step's windows."""
        self.step += 1
        self._file.write(json_text({"step": self.step, "windows": windows}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _step_of(line: str) -> float:
    """The step of a sample-log row; a torn row (a kill mid-write) counts as after any step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class RankBatches:
    """This rank's contiguous share of every global step batch drawn from ``batches``."""

    def __init__(
        self, batches: StepBatches, placement: Local, sample_log: SampleLog | None = None
    ) -> None:
        if sample_log is not None and not hasattr(batches, "window_ids"):
            raise ConfigError(
                "logging.sample_ids: this job's batches do not report window ids; turn it off"
            )
        self.batches = batches
        self.placement = placement
        self.sample_log = sample_log

    def begin(self, step: int) -> None:
        """Training continues after ``step`` (0 for a new run)."""
        if self.sample_log is not None:
            self.sample_log.begin(step)

    def next_batch(self) -> Batch:
        batch = self.batches.next_batch()
        rows = batch_size(batch)
        world, rank = self.placement.world_size, self.placement.rank
        if rows % world:
            raise DataError(f"a step batch of {rows} windows does not split over {world} ranks")
        lo, hi = rank * rows // world, (rank + 1) * rows // world
        if self.sample_log is not None:
            self.sample_log.record(self.batches.window_ids()[lo:hi])  # type: ignore[attr-defined]
        if world == 1:
            return batch
        if isinstance(batch, torch.Tensor):
            return batch[lo:hi]
        return {k: v[lo:hi] for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)

    def close(self) -> None:
        self.batches.close()
        if self.sample_log is not None:
            self.sample_log.close()


def partition(batches: StepBatches, config: Config, run: Run, placement: Local) -> RankBatches:
    """Wrap a job's global step batches into this rank's share (and the sample-id log)."""
    log = SampleLog(run.path, placement) if config.logging.sample_ids else None
    return RankBatches(batches, placement, log)
