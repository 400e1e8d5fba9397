"""The one training loop.

Each step, in this order: forward, loss, backward (per micro-batch), gradient clipping,
optimizer step, zero grads, log; then, when due, evaluate and checkpoint. Everything that
affects future results is in the checkpoint, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.checkpoint import apply_retention, check_model_state, checkpoint_due
from kiln.config import Config
from kiln.engine.job import TrainableJob, batch_size, batch_to, split_batch
from kiln.engine.memory import SpikeDetector, memory_in_use, memory_report
from kiln.engine.optim import (
    build_optimizer,
    build_scheduler,
    normalize_gradients,
    regularization_terms,
)
from kiln.engine.placement import Local
from kiln.engine.precision import autocast, build_scaler
from kiln.engine.progress import ProgressDisplay
from kiln.errors import KilnError
from kiln.repro import capture_rng_state, restore_rng_state
from kiln.run import Run, write_eval
from kiln.signals import StopSignals


class OutOfMemoryExit(KilnError):
    """Out of memory at micro-batch 1 (or with retries off): the run checkpointed and stopped."""


@dataclass
class Progress:
    """Counters that a checkpoint carries besides the components' own state."""

    step: int = 0
    tokens_seen: int = 0
    micro_batch_size: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    last_val: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class StepResult:
    loss: float
    components: dict[str, float]
    grad_norm: float


class Trainer:
    """Trains a job under a config, writing into a run directory.

    ``placement`` (default: one process) says where the loop runs; ``self.model`` is the
    plain module (state, evaluation) and ``self.train_model`` what the training forward calls.
    """

    def __init__(
        self,
        config: Config,
        job: TrainableJob,
        run: Run,
        device: torch.device,
        placement: Local | None = None,
    ) -> None:
        self.cfg = config
        self.job = job
        self.run = run
        self.device = device
        self.placement = placement or Local()
        self.model = self.placement.place(job.model, device)
        self.train_model = self.placement.wrap(self.model)
        self.optimizer = build_optimizer(self.model, config.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, config.training.max_steps)
        self.scaler = build_scaler(config.precision, device)
        self.progress = Progress(micro_batch_size=config.training.micro_batch_size)
        self.spikes = SpikeDetector(config.logging.memory_spike_ratio)
        self._last_checkpoint_time = time.monotonic()
        self._saved_step: int | None = None

    # ------------------------------------------------------------------ state

    def state_dict(self, loader_state: dict[str, Any], rng: dict[str, Any]) -> dict[str, Any]:
        """The union of every component's state: exactly what a checkpoint holds."""
        return {
            **self.placement.model_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "loader": loader_state,
            "progress": self.progress.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.placement.load_model_state(self.model, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.job.batches.load_state_dict(state["loader"])
        self.progress.load_state_dict(state["progress"])
        restore_rng_state(state["rng"])

    def resume_from_checkpoint(self) -> bool:
        """Load the latest valid checkpoint, if any; True if one was loaded."""
        found = self.placement.load_latest_valid(
            self.run.checkpoints, self.run.log, self.model, self.optimizer
        )
        if found is None:
            # Killed before its first checkpoint: every step logged so far runs again.
            self.run.truncate_metrics_after(0)
            return False
        info, state = found
        if "model" in state:  # a streamed run's weights are in its store, checked there
            check_model_state(info.path, self.model, state["model"])
        self.load_state_dict(state)
        self.run.truncate_metrics_after(self.progress.step)
        self.run.log(f"resumed from {info.path.name} (step {self.progress.step})")
        return True

    def save(self, loader_state: dict[str, Any] | None = None, rng: dict | None = None) -> None:
        """Checkpoint now; defaults capture the state at the current step boundary."""
        step = self.progress.step
        val = self.progress.last_val if self.progress.last_val.get("step") == step else {}
        meta = {
            "step": step,
            "tokens_seen": self.progress.tokens_seen,
            "val_loss": val.get("val_loss"),
            "config_fingerprint": self.cfg.fingerprint(),
            **self.placement.describe(),
        }
        state = self.state_dict(
            loader_state if loader_state is not None else self.job.batches.state_dict(),
            rng if rng is not None else capture_rng_state(),
        )
        path = self.placement.save_checkpoint(self.run.checkpoints, step, state, meta)
        self._last_checkpoint_time = time.monotonic()
        self._saved_step = step
        if path is None:  # another rank published it, or a streamed step committed in place
            return
        protect = {self.progress.best_step} if self.cfg.checkpoint.keep_best else set()
        apply_retention(self.run.checkpoints, self.cfg.checkpoint.keep_last, protect - {None})
        self.run.log(f"checkpoint {path.name}")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Progress:
        """Train to ``max_steps``, or until a signal asks to stop. Returns the final counters."""
        cfg = self.cfg
        display = ProgressDisplay(
            cfg.training.max_steps,
            self.progress.step,
            cfg.logging.progress and self.placement.is_main,
        )
        started = time.monotonic() - self.progress.wall_time
        # SIGINT/SIGTERM finish the current step, checkpoint and stop; a second one aborts.
        with StopSignals() as stop:
            with display:
                while self.progress.step < cfg.training.max_steps:
                    # Every rank stops at the same step, whichever rank got the signal.
                    if self.placement.any(stop.received is not None):
                        self.progress.wall_time = time.monotonic() - started
                        if self._saved_step != self.progress.step:  # not already saved
                            self.save()
                        self.run.set_status("interrupted")
                        by = stop.received or "sent to another rank"
                        self.run.log(f"stopped by signal {by}; resume to continue")
                        return self.progress

                    loader_state, rng = self.job.batches.state_dict(), capture_rng_state()
                    batch = self.job.batches.next_batch()
                    t0 = time.perf_counter()
                    result = self._step_with_oom_retry(batch, loader_state, rng)
                    elapsed = time.perf_counter() - t0
                    self.progress.step += 1
                    tokens = self.job.tokens_in(batch) * self.placement.world_size
                    self.progress.tokens_seen += tokens
                    self.progress.wall_time = time.monotonic() - started

                    step = self.progress.step
                    final = step == cfg.training.max_steps
                    display.update(step, result.loss, tokens / elapsed)
                    if step % cfg.logging.every_steps == 0 or final:
                        self._log_step(result, tokens / elapsed, echo=not display.active)
                    # The final evaluation comes before the final checkpoint, which records it.
                    if final or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0):
                        self.evaluate()
                    if final or self._checkpoint_due(step):
                        self.save()
            # No step ran here (resumed at max_steps): make sure the last step is evaluated and
            # its checkpoint records it.
            if self.progress.last_val.get("step") != self.progress.step:
                self.evaluate()
            if self._saved_step != self.progress.step:
                self.save()
        self.placement.finish()
        self.run.set_status("completed")
        return self.progress

    def _step_with_oom_retry(
        self, batch: Any, loader_state: dict[str, Any], rng: dict[str, Any]
    ) -> StepResult:
        """One optimizer step; on out-of-memory halve the micro-batch and redo the step.

        The effective batch is unchanged (micro-batch losses are weighted by their share of
        the step's samples), so the math is the same. At micro-batch 1 the run checkpoints
        the state from before this step and stops.
        """
        while True:
            try:
                return self._train_step(batch)
            except torch.OutOfMemoryError:
                if self.placement.world_size > 1:
                    raise  # ranks cannot change their micro-batch alone: the job fails
                self.optimizer.zero_grad(set_to_none=True)
                micro = self.progress.micro_batch_size
                self.run.log(
                    f"out of memory at step {self.progress.step + 1} with micro-batch {micro}: "
                    f"{memory_report(self.device)}"
                )
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if micro == 1 or not self.cfg.training.oom_retry:
                    self.save(loader_state, rng)
                    self.run.set_status("failed")
                    raise OutOfMemoryExit(
                        f"out of memory even at micro-batch {micro}; the state before step "
                        f"{self.progress.step + 1} is checkpointed in {self.run.checkpoints}. "
                        "Reduce model.d_model/n_layers or data.seq_len, or use bf16, then "
                        "start a new run."
                    ) from None
                self.progress.micro_batch_size = micro // 2
                micro_batches = math.ceil(batch_size(batch) / self.progress.micro_batch_size)
                self.run.log(
                    f"retrying step {self.progress.step + 1} with micro-batch "
                    f"{self.progress.micro_batch_size} x {micro_batches} accumulation"
                )
                restore_rng_state(rng)

    def _train_step(self, batch: Any) -> StepResult:
        """One optimizer step, run by the placement (streaming runs it chunk by chunk)."""
        return self.placement.train_step(self, batch)

    def in_memory_step(self, batch: Any) -> StepResult:
        """forward, loss, backward for each micro-batch; clip; step; zero grads."""
        total = batch_size(batch)
        # Detached running sums: one host sync per step instead of one per micro-batch.
        sums: dict[str, torch.Tensor] = {}
        micros = split_batch(batch, self.progress.micro_batch_size)
        for index, micro in enumerate(micros):
            micro = batch_to(micro, self.device)
            weight = batch_size(micro) / total
            last = index == len(micros) - 1
            with self.placement.accumulating(self.train_model, sync=last):
                with autocast(self.cfg.precision, self.device):
                    loss, parts = self.job.loss(self.train_model, micro)
                self.scaler.scale(loss * weight).backward()
            for name, value in {"loss": loss, **parts}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * weight

        # The explicit objective terms depend on the weights only: added once per step.
        terms = regularization_terms(self.model, self.cfg.optimizer)
        if terms:
            regularizer = sum(terms.values())
            self.scaler.scale(regularizer).backward()
            sums["loss"] = sums["loss"] + regularizer.detach()
            sums.update({name: value.detach() for name, value in terms.items()})

        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.training.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.cfg.training.grad_normalization == "per_tensor":
            normalize_gradients(self.model.parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        values = self.placement.reduce_mean({name: value.item() for name, value in sums.items()})
        return StepResult(values.pop("loss"), values, float(grad_norm))

    # ------------------------------------------------------------------ periodic work

    def evaluate(self) -> dict[str, float]:
        """Evaluate at the current step; tracks the best validation loss.

        Scalar metrics go to metrics.jsonl and the checkpoint's counters; everything the job
        returned (per-sample details too) goes to ``eval/<step>.json``.
        """
        step = self.progress.step
        self.model.eval()
        try:
            with (
                self.placement.evaluation(),
                torch.no_grad(),
                autocast(self.cfg.precision, self.device),
            ):
                results = self.job.evaluate(
                    self.model, final=step >= self.cfg.training.max_steps
                )
        finally:
            self.model.train()
        metrics = {
            k: v for k, v in results.items() if isinstance(v, float | int) and k != "step"
        }
        self.progress.last_val = {"step": step, **metrics}
        best, loss = self.progress.best_val_loss, metrics["val_loss"]
        # A diverged evaluation (NaN) is never the best: every comparison with it is False.
        if math.isfinite(loss) and (best is None or not math.isfinite(best) or loss < best):
            self.progress.best_val_loss = metrics["val_loss"]
            self.progress.best_step = step
        self.run.write_metrics({"step": step, "event": "eval", **metrics})
        if self.placement.is_main:
            write_eval(self.run.path, step, results)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if "skipped_suites" in results:
            shown += f" (skipped within the time budget: {', '.join(results['skipped_suites'])})"
        self.run.log(f"eval step {step}: {shown}")
        return metrics

    def _checkpoint_due(self, step: int) -> bool:
        if self.placement.commits_every_step:
            return True
        c = self.cfg.checkpoint
        since = time.monotonic() - self._last_checkpoint_time
        due = checkpoint_due(step, c.every_steps, c.every_minutes, since)
        # Clocks differ between ranks: they agree, as a sharded save needs all of them.
        return self.placement.any(due) if c.every_minutes else due

    def _log_step(self, result: StepResult, tokens_per_sec: float, *, echo: bool) -> None:
        in_use = memory_in_use(self.device)
        step = self.progress.step
        row = {
            "step": step,
            "loss": result.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_sec": tokens_per_sec,
            "grad_norm": result.grad_norm,
            "memory_bytes": in_use,
            "tokens_seen": self.progress.tokens_seen,
            "micro_batch_size": self.progress.micro_batch_size,
            **{f"loss_{name}": value for name, value in result.components.items()},
        }
        if self.scaler.is_enabled():
            row["loss_scale"] = self.scaler.get_scale()
        row.update(self.placement.step_metrics())
        self.run.write_metrics(row)
        if self.spikes.observe(in_use):
            self.run.log(
                f"memory spike at step {step}: {in_use / 2**20:.0f} MiB in use, above "
                f"{self.spikes.ratio}x the earlier peak"
            )
        line = (
            f"step {step}/{self.cfg.training.max_steps} loss {result.loss:.4f} "
            f"lr {row['lr']:.3g} grad_norm {result.grad_norm:.3g} {tokens_per_sec:,.0f} tok/s"
        )
        self.run.log(line, echo=echo)
