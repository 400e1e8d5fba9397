"""One optimizer step's batch drawn from several weighted-window loaders, normalised as a whole.

The loss of a step is the weighted mean cross-entropy over all of its target tokens,
``sum(w * ce) / sum(w)``, and each component's logged loss is the plain mean over the component's
trained tokens. The trainer cuts a step into micro-batches and weights each by its share of the
samples, so the normalisers are folded into the batch here, where the whole step is known:

- ``weights`` is rescaled so that it sums to ``samples * seq_len`` over the step; a micro-batch's
  ``sum(w * ce) / (micro_samples * seq_len)``, weighted by ``micro_samples / samples``, then adds
  up to exactly the step's weighted mean, however the step is split (an out-of-memory retry with a
  smaller micro-batch computes the same thing).
- ``component_scale`` does the same for each component's mean: it is
  ``samples * seq_len / (trained tokens of that component in the step)`` on trained tokens, else 0.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.data.loader import WindowLoader
from kiln.data.objectives import COMPONENTS
from kiln.errors import DataError


def normalize_step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the step-level normalisers to a batch of weighted windows (see the module doc)."""
    weights, components = batch["weights"], batch["components"]
    positions = weights.numel()
    total = weights.sum()
    scaled = weights * (positions / total) if total > 0 else weights
    trained = weights > 0
    counts = torch.bincount(components[trained], minlength=len(COMPONENTS))
    per_component = positions / counts.clamp(min=1).to(torch.float32)
    component_scale = torch.where(trained, per_component[components], 0.0)
    return {**batch, "weights": scaled, "component_scale": component_scale}


class MixedBatches:
    """Each step, the batches of every named loader concatenated and normalised."""

    def __init__(self, loaders: dict[str, WindowLoader]) -> None:
        self.loaders = loaders

    def next_batch(self) -> dict[str, torch.Tensor]:
        parts = [loader.next_batch() for loader in self.loaders.values()]
        keys = parts[0].keys()
        return normalize_step({k: torch.cat([p[k] for p in parts]) for k in keys})

    def window_ids(self) -> list[list[str | int]]:
        """``[loader name, window id]`` of each row of the last batch, in row order."""
        return [
            [name, window]
            for name, loader in self.loaders.items()
            for window in loader.last_batch_window_ids
        ]

    def state_dict(self) -> dict[str, Any]:
        return {name: loader.state_dict() for name, loader in self.loaders.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.loaders) - set(state))
        if missing:
            raise DataError(
                f"the checkpoint has no data cursor for {missing} (it has {sorted(state)}): "
                "the objectives changed since it was saved; restore them or start a new run"
            )
        for name, loader in self.loaders.items():
            loader.load_state_dict(state[name])

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()
