"""The `streaming` strategy as a placement: the trainer's loop, with the weights on disk.

The model's parameters and optimizer state live in the chunk store; a step streams the chunks
through memory (``StreamedTraining.train_step``) and every step is committed by one atomic
manifest replace, which is also the run's only checkpoint. The replace happens in the background
once the step's writes are durable; ``close`` waits for it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.checkpoint import CheckpointInfo
from kiln.engine.placement import Local
from kiln.engine.trainer import StepResult, Trainer
from kiln.streaming.executor import StreamedTraining


class Streamed(Local):
    """One process whose weights and optimizer state stream from a chunk store."""

    strategy = "streaming"
    commits_every_step = True  # old chunk versions are deleted only after a commit

    def __init__(self, training: StreamedTraining) -> None:
        self.training = training

    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        return model  # chunks move to the device one at a time

    def train_step(self, trainer: Trainer, batch: Any) -> StepResult:
        lrs = [group["lr"] for group in trainer.optimizer.param_groups]
        loss, parts, norm = self.training.train_step(
            batch, trainer.progress.micro_batch_size, lrs, trainer.progress.step
        )
        with warnings.catch_warnings():  # this optimizer only holds the lrs: it never steps
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            trainer.scheduler.step()
        return StepResult(loss, parts, norm)

    def model_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"optimizer": optimizer.state_dict()}  # the weights are the committed chunks

    def load_model_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(
        self, ckpt_root: Path, step: int, state: dict[str, Any], meta: dict
    ) -> Path | None:
        self.training.commit(step, state, meta)
        return None

    def load_latest_valid(
        self,
        ckpt_root: Path,
        warn: Callable[[str], None],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        state = self.training.resume()
        if state is None:
            return None
        step = state["progress"]["step"]
        return CheckpointInfo(self.training.store.root, step, {"step": step}), state

    def evaluation(self) -> contextlib.AbstractContextManager:
        return self.training.model_in_memory()

    def step_metrics(self) -> dict[str, float]:
        return self.training.metrics

    def finish(self) -> None:
        self.training.load_model()  # for the job's final report

    def close(self) -> None:
        self.training.close()  # the last commit runs on the writer thread
