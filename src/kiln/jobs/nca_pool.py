"""The Growing-NCA sample pool: the job's resumable source of batches.

Each step samples a batch of states from the pool (without replacement), replaces the one
farthest from the target by a fresh seed, optionally damages the closest ones, and draws the
rollout length and every fire-rate mask of the rollout up front. The loss writes the grown
states back by pool index. All of it runs on the CPU from the pool's own seeded generator,
and the pool and that generator are the checkpointed state, so a resumed run continues with
exactly the pool an uninterrupted one would have.

Write-backs are staged and applied at the next ``next_batch``/``state_dict``: the trainer
keeps the state it captured before a step for an out-of-memory failure, and that state must
not see the half-finished step. A retried step stages every index again, and the later write
wins. The batch carries its own start states and masks, so cutting it into micro-batches
changes nothing but the order of float sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import CheckpointError
from kiln.models.nca import damage

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PoolSettings:
    """How batches are drawn (the ``nca`` config section and the step's batch size)."""

    pool_size: int  # 0: every batch grows from the seed
    batch_size: int
    rollout_min: int
    rollout_max: int
    fire_rate: float
    damage: int  # lowest-loss samples of a batch that get a disc erased


def sample_losses(states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of the RGBA channels: (B, C, H, W), (4, H, W) -> (B,)."""
    return (states[:, :4].float() - target).pow(2).mean(dim=(1, 2, 3))


def diversity(states: torch.Tensor) -> float:
    """Mean over cells and RGBA channels of the standard deviation across states (0: all equal)."""
    if states.shape[0] < 2:
        return 0.0
    return states[:, :4].std(dim=0).mean().item()


class NCAPool:
    """Pool states (pool_size, C, H, W), fp32 on the CPU, starting as copies of the seed."""

    def __init__(self, seed: torch.Tensor, target: torch.Tensor, settings: PoolSettings,
                 rng_seed: int) -> None:
        self.seed = seed  # (C, H, W)
        self.target = target  # (4, H, W)
        self.settings = settings
        self.generator = torch.Generator().manual_seed(rng_seed)
        self.states = seed.expand(settings.pool_size, *seed.shape).clone()
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_diversity = 0.0  # of the pool the latest batch was drawn from

    def next_batch(self) -> Batch:
        """{"index": (B,), "state": (B, C, H, W), "fire": (B, T, H, W) bool} for one step.

        ``index`` is -1 for samples that do not return to the pool (pool_size 0).
        """
        s, g = self.settings, self.generator
        self.last_diversity = self.pool_diversity()
        if s.pool_size == 0:  # the paper's first experiment: no pool, always from the seed
            index = torch.full((s.batch_size,), -1, dtype=torch.long)
            states = self.seed.expand(s.batch_size, *self.seed.shape).clone()
        else:
            index = torch.randperm(s.pool_size, generator=g)[: s.batch_size]
            states = self.states[index]
            # Worst first: the worst is reseeded, the best (last) are the ones damaged.
            order = torch.sort(sample_losses(states, self.target), descending=True, stable=True)
            index, states = index[order.indices], states[order.indices]
            states[0] = self.seed
            if s.damage:
                states[-s.damage :] = damage(states[-s.damage :], g)
        steps = int(torch.randint(s.rollout_min, s.rollout_max + 1, (1,), generator=g))
        _, _, h, w = states.shape
        fire = torch.rand((s.batch_size, steps, h, w), generator=g) < s.fire_rate
        return {"index": index, "state": states, "fire": fire}

    def put_back(self, index: torch.Tensor, states: torch.Tensor) -> None:
        """Stage grown states to return to the pool at ``index`` (ignoring index -1)."""
        keep = index >= 0
        if keep.any():
            self._staged.append((index[keep].cpu(), states[keep].detach().float().cpu()))

    def pool_diversity(self) -> float:
        """``diversity`` of the whole pool (0 for pool_size 0)."""
        self._apply_staged()
        return diversity(self.states)

    def _apply_staged(self) -> None:
        for index, states in self._staged:
            self.states[index] = states
        self._staged.clear()

    def state_dict(self) -> dict[str, Any]:
        """The pool (not copied: the checkpoint writer copies it) and the generator state."""
        self._apply_staged()
        return {"states": self.states, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["states"]
        if states.shape != self.states.shape:
            raise CheckpointError(
                f"the checkpoint's NCA pool has shape {tuple(states.shape)}, this config's "
                f"{tuple(self.states.shape)}: it was saved for another nca section"
            )
        self._staged.clear()
        self.states.copy_(states)
        self.generator.set_state(state["generator"])

    def close(self) -> None:
        """Nothing to release: the pool holds no files or threads."""
