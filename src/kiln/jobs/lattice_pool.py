"""The lattice job's batches: a pool of lattice states and a seeded walk over dialogue pairs.

Each step takes ``samples`` pool slots (a seeded random choice without replacement) and the next
``samples`` training pairs of a seeded per-epoch permutation. With ``replace_worst``, the slot
whose last recorded loss is the highest starts again from the seed state (where every slot
starts), as in Growing NCA's pool training. The batch carries the slots' starting states, their
indices and one seed per sample for the fire-rate masks, so a step redone with smaller
micro-batches (after an out-of-memory error) starts from the same states and writes the same
slots again.

The job writes each micro-batch's detached final states and per-sample losses back with
``write_back``. Updates replace ``states`` by a new tensor instead of writing into it, so a
``state_dict`` taken before a step stays the state from before it. Everything here is in the
checkpoint: states, losses, the sampler's generator and the pair cursor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from kiln.errors import CheckpointError

SEED_BOUND = 1 << 62


class LatticePool:
    """A ``StepBatches`` of pool states and dialogue pair indices."""

    def __init__(
        self,
        *,
        pool_size: int,
        seed_state: torch.Tensor,
        num_pairs: int,
        samples: int,
        seed: int,
        replace_worst: bool = True,
        channels_last: bool = True,
    ) -> None:
        if samples > pool_size:
            raise ValueError(f"a step takes {samples} samples but the pool holds {pool_size}")
        if num_pairs < samples:
            raise ValueError(f"a step takes {samples} dialogue pairs but there are {num_pairs}")
        self.pool_size, self.samples, self.num_pairs = pool_size, samples, num_pairs
        self.seed, self.replace_worst, self.channels_last = seed, replace_worst, channels_last
        self.seed_state = seed_state.float()  # (D, H, W, K)
        # channels-last keeps the model's (D, H, W, K) layout; channels-first stores (K, D, H, W).
        stored = self.seed_state if channels_last else self.seed_state.permute(3, 0, 1, 2)
        self.states = stored.expand(pool_size, *stored.shape).contiguous()
        self.losses = torch.full((pool_size,), math.nan)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0

    # ---- batches --------------------------------------------------------------------------------

    def _as_model_layout(self, stored: torch.Tensor) -> torch.Tensor:
        return stored if self.channels_last else stored.permute(0, 2, 3, 4, 1)

    def _pairs(self) -> torch.Tensor:
        """The next ``samples`` pair indices; an epoch's short remainder is skipped."""
        if self.position + self.samples > self.num_pairs:
            self.epoch, self.position = self.epoch + 1, 0
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
        picked = rng.permutation(self.num_pairs)[self.position : self.position + self.samples]
        self.position += self.samples
        return torch.from_numpy(picked.astype(np.int64))

    def next_batch(self) -> dict[str, torch.Tensor]:
        slots = torch.randperm(self.pool_size, generator=self.generator)[: self.samples]
        states = self._as_model_layout(self.states[slots])  # (B, D, H, W, K)
        if self.replace_worst:
            known = self.losses[slots]
            if not torch.isnan(known).all():
                worst = int(torch.nan_to_num(known, nan=-math.inf).argmax())
                states = states.clone()
                states[worst] = self.seed_state
        seeds = torch.randint(SEED_BOUND, (self.samples,), generator=self.generator)
        return {"slot": slots, "pair": self._pairs(), "state": states, "seed": seeds}

    def write_back(self, slots: torch.Tensor, states: torch.Tensor, losses: torch.Tensor) -> None:
        """Store the final states (B, D, H, W, K) and per-sample losses of ``slots``."""
        slots = slots.cpu()
        states = states.detach().float().cpu()
        if not self.channels_last:
            states = states.permute(0, 4, 1, 2, 3)
        self.states = self.states.index_copy(0, slots, states.contiguous())
        self.losses = self.losses.index_copy(0, slots, losses.detach().float().cpu())

    def diversity(self) -> float:
        """RMS distance of the pool's states from their mean: 0 when all states are equal."""
        flat = self.states.flatten(1)
        return float((flat - flat.mean(0)).square().mean().sqrt())

    # ---- resumable state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "states": self.states,
            "losses": self.losses,
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict``; a pool saved under other settings is refused."""
        if tuple(state["states"].shape) != tuple(self.states.shape):
            # Only an edited config_snapshot.yaml gets here: the model's shapes matched.
            raise CheckpointError(
                f"the checkpoint's lattice pool has shape {tuple(state['states'].shape)}, this "
                f"config's {tuple(self.states.shape)}: lattice.pool_size or "
                "lattice.channels_last_3d differs from the run's; restore them in its "
                "config_snapshot.yaml, or start a new run"
            )
        self.states = state["states"].clone()
        self.losses = state["losses"].clone()
        self.generator.set_state(state["generator"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        """Nothing is held open."""
