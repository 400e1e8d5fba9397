"""What the trainer asks about where training happens: the placement.

A placement says where the model lives and what wraps it, who runs a step, whether a
micro-batch synchronises gradients, how the model and optimizer state is saved and loaded, how
step metrics and stop decisions are agreed over ranks, and what evaluation needs. ``Local`` is
one process on one device (``strategy.name: single``), the plain behaviour of every hook. The
others subclass it: ``kiln.engine.distributed`` (DDP, FSDP) and ``kiln.streaming.placement``
(weights on disk).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kiln.checkpoint import CheckpointInfo, load_latest_valid, save_checkpoint

if TYPE_CHECKING:  # the trainer imports this module
    from kiln.engine.trainer import StepResult, Trainer


class Local:
    """One process: every hook is the plain single-process behaviour, with no collectives."""

    strategy = "single"
    # Whether every step is a checkpoint (a streamed step commits its chunk versions).
    commits_every_step = False
    rank = 0
    local_rank = 0
    world_size = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the run directory."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """Strategy, world size and backend, for the run log and checkpoint metadata."""
        return {"strategy": self.strategy, "world_size": self.world_size, "backend": self.backend}

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on."""
        return device

    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model, on the device it trains on."""
        return model.to(device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward goes through."""
        return model

    def train_step(self, trainer: Trainer, batch: Any) -> StepResult:
        """One optimizer step: the trainer's in-memory step."""
        return trainer.in_memory_step(batch)

    def evaluation(self) -> contextlib.AbstractContextManager:
        """Context of an evaluation (the weights are where the model can read them)."""
        return contextlib.nullcontext()

    def step_metrics(self) -> dict[str, float]:
        """Extra per-step metrics of this placement."""
        return {}

    def finish(self) -> None:
        """Training completed: make the final weights available in ``model``."""

    def close(self) -> None:
        """Training ended, however: every checkpoint saved is durable when this returns."""

    def accumulating(self, model: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward; ``sync`` on the step's last."""
        return contextlib.nullcontext()

    def model_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The model's and optimizer's entries of the trainer state."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def load_model_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Inverse of ``model_state``."""
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(
        self, ckpt_root: Path, step: int, state: dict[str, Any], meta: dict
    ) -> Path | None:
        """Write the checkpoint; the path on the rank that published it, else None."""
        return save_checkpoint(ckpt_root, step, state, meta)

    def load_latest_valid(
        self,
        ckpt_root: Path,
        warn: Callable[[str], None],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """The newest checkpoint that verifies, the same one on every rank (None: there is none)."""
        return load_latest_valid(ckpt_root, warn)

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each metric's mean over ranks (a rank without a metric counts as 0)."""
        return values

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank."""
        return flag

    def barrier(self) -> None:
        """Wait for every rank."""

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0 first (it fills shared caches), then on the others."""
        yield
