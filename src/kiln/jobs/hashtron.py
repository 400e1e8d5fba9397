"""The hashtron job: config -> task and pipeline; the step, log, checkpoint and resume loop.

The gradient engine is not used. One step of ``HashtronLoop.fit`` is one step of the hashtron
pipeline (one neuron trained, or one failed attempt at it; see ``kiln.hashtron.pipeline``):

    step -> metrics row (+ one event per alert) -> log line -> checkpoint when due

SIGINT/SIGTERM stop at the next step boundary with a checkpoint (``kiln.signals``). The
checkpoint is the pipeline's ``state_dict()`` (network, sum cache, random generator, phase,
position, attempt counters, alert state) plus the wall time, so ``kiln resume`` continues
exactly: same network bytes, same deterministic sum-cache columns, same metrics rows.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from kiln.checkpoint import apply_retention, checkpoint_due, load_latest_valid, save_checkpoint
from kiln.config import Config
from kiln.hashtron.multitask import build_pipeline
from kiln.hashtron.pipeline import StepReport
from kiln.hashtron.serialize import network_from_state, save_network
from kiln.hashtron.tasks import Task
from kiln.run import Run
from kiln.signals import StopSignals

NETWORK_FILE = "network.safetensors"


def load_task_for(config: Config) -> Task:
    """Load the task of a ``job: hashtron`` config and check that the network fits it.

    Unknown task names, bad task options, unreadable data files and bad ``hashtron.layers``
    raise ``ConfigError``/``DataError`` here, so ``kiln train`` fails before it creates a run
    directory. The returned task is handed to ``HashtronLoop`` so that it is loaded once.
    """
    _, task = build_pipeline(config.hashtron.to_settings(), config.seed)
    return task


class HashtronLoop:
    """Trains one hashtron run inside its run directory (see the module doc)."""

    def __init__(self, run: Run, task: Task | None = None) -> None:
        self.run = run
        self.cfg = run.config
        self.pipeline, self.task = build_pipeline(
            self.cfg.hashtron.to_settings(), self.cfg.seed, run.id, task
        )
        self.wall_time = 0.0
        self._last_checkpoint_time = time.monotonic()
        self._saved_step: int | None = None

    @property
    def step(self) -> int:
        """Pipeline steps done."""
        return self.pipeline.step_count

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Exactly what a checkpoint holds."""
        return {"pipeline": self.pipeline.state_dict(), "wall_time": self.wall_time}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict``; ``CheckpointError`` if it is for other data/settings."""
        self.pipeline.load_state_dict(state["pipeline"])
        self.wall_time = float(state["wall_time"])

    def resume_from_checkpoint(self) -> bool:
        """Load the latest valid checkpoint, if any; True if one was loaded.

        Metrics rows written after the checkpoint's step are dropped: those steps run again.
        """
        found = load_latest_valid(self.run.checkpoints, warn=self.run.log)
        if found is None:
            self.run.truncate_metrics_after(0)
            return False
        info, state = found
        self.load_state_dict(state)
        self.run.truncate_metrics_after(self.step)
        self._saved_step = self.step
        self.run.log(f"resumed from {info.path.name} (step {self.step})")
        return True

    def save(self) -> None:
        """Checkpoint the current step boundary and apply retention."""
        p = self.pipeline
        meta = {
            "step": self.step,
            "epoch": p.epoch,
            "done": p.done,
            "train_accuracy": p.train_accuracy,
            "eval_accuracy": p.eval_accuracy,
            "config_fingerprint": self.cfg.fingerprint(),
        }
        path = save_checkpoint(self.run.checkpoints, self.step, self.state_dict(), meta)
        apply_retention(self.run.checkpoints, self.cfg.checkpoint.keep_last, set())
        self._last_checkpoint_time = time.monotonic()
        self._saved_step = self.step
        self.run.log(f"checkpoint {path.name}")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Step until the pipeline is done or a signal asks to stop; returns the summary."""
        self._log_start()
        started = time.monotonic() - self.wall_time
        with StopSignals() as stop:
            while not self.pipeline.done:
                if stop.received is not None:
                    self.wall_time = time.monotonic() - started
                    if self._saved_step != self.step:
                        self.save()
                    self.run.set_status("interrupted")
                    self.run.log(f"stopped by signal {stop.received}; resume to continue")
                    return self.write_summary()
                report = self.pipeline.step()
                self.wall_time = time.monotonic() - started
                self._record(report)
                if self._checkpoint_due():
                    self.save()
            if self._saved_step != self.step:
                self.save()
        self.run.set_status("completed")
        return self.write_summary()

    def _record(self, report: StepReport) -> None:
        """The step's metrics row, its alert events and its log lines."""
        self.run.write_metrics(report.to_dict())
        for alert in report.alerts:
            self.run.write_metrics(alert.to_dict())
            self.run.log(alert.log_line())
        shown = (
            report.epoch_end
            or report.done
            or report.step % self.cfg.logging.every_steps == 0
        )
        self.run.log(report.log_line(), echo=shown)

    def _checkpoint_due(self) -> bool:
        c = self.cfg.checkpoint
        since = time.monotonic() - self._last_checkpoint_time
        return checkpoint_due(self.step, c.every_steps, c.every_minutes, since)

    def _log_start(self) -> None:
        task, net = self.task, self.pipeline.network
        widths = "+".join(str(layer.width) for layer in net.layers)
        eval_n = 0 if task.eval is None else len(task.eval)
        settings = self.pipeline.settings.pipeline
        self.run.log(
            f"hashtron task {task.name}: {len(task.train)} train / {eval_n} eval samples, "
            f"{task.label_bits} label bit(s); network {len(net.layers)} layers ({widths} "
            f"neurons); {settings.direction} pipeline, {settings.epochs} epoch(s), seed "
            f"{self.cfg.seed}"
        )

    def write_summary(self) -> dict[str, Any]:
        """metrics.json: the pipeline's summary plus the run's status, step and wall time."""
        task = self.task
        summary = {
            "run_id": self.run.id,
            "job": "hashtron",
            "status": self.run.status(),
            "step": self.step,
            "wall_time_sec": self.wall_time,
            "task": task.name,
            "train_samples": len(task.train),
            "eval_samples": 0 if task.eval is None else len(task.eval),
            "eval_majority_baseline": task.majority_baseline("eval"),
            **self.pipeline.summary(),
        }
        self.run.write_summary(summary)
        return summary


def network_file(state: dict[str, Any]) -> bytes:
    """The network of a hashtron checkpoint's state as ``save_network`` writes it (the bytes
    of ``network.safetensors``; ``kiln.hashtron.load_network`` reads it back)."""
    network = network_from_state(state["pipeline"]["network"], "checkpoint network")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / NETWORK_FILE
        save_network(network, path)
        return path.read_bytes()
