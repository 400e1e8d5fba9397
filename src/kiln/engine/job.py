"""What the engine needs from a job: a model, batches, a loss with named parts, an evaluation.

The engine knows nothing else about what is trained; adding a model family means writing a job.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from kiln.data.loader import Batch


class StepBatches(Protocol):
    """Yields one optimizer step's worth of samples for this rank; resumable."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TrainableJob(Protocol):
    """A gradient job as the trainer sees it."""

    model: nn.Module
    batches: StepBatches

    def loss(
        self, model: nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over the samples of ``batch`` and its named components (for logging)."""
        ...

    def tokens_in(self, batch: Batch) -> int:
        """Units of throughput in ``batch`` (tokens for a language model)."""
        ...

    def evaluate(self, model: nn.Module, *, final: bool) -> dict[str, Any]:
        """Validation results; must include a float ``val_loss``. Must not touch the global RNGs.

        ``final`` marks the evaluation at the end of training, which runs everything configured.
        Float and int values are metrics; other values (samples, reports) are details.
        """
        ...

    def final_report(self, model: nn.Module) -> str | None:
        """Text shown when training completes (the LM prints a code sample), or None."""
        ...

    def close(self) -> None:
        """Release what the job holds open (loader threads, files)."""
        ...


def batch_size(batch: Batch) -> int:
    """Samples in a batch (its leading dimension)."""
    first = batch if isinstance(batch, torch.Tensor) else next(iter(batch.values()))
    return first.shape[0]


def split_batch(batch: Batch, micro_batch_size: int) -> list[Batch]:
    """Cut a step's batch into micro-batches along the sample dimension."""
    if isinstance(batch, torch.Tensor):
        return list(batch.split(micro_batch_size))
    pieces = {k: v.split(micro_batch_size) for k, v in batch.items()}
    return [dict(zip(pieces, parts, strict=True)) for parts in zip(*pieces.values(), strict=True)]


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """Move a batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
