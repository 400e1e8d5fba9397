"""The NCA sample pool: sampling, reseeding the worst, damage, staged write-back, state."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import CheckpointError
from kiln.jobs.nca_pool import NCAPool, PoolSettings, diversity, sample_losses

C, H, W = 6, 9, 9


def seed_state() -> torch.Tensor:
    seed = torch.zeros(C, H, W)
    seed[3:, H // 2, W // 2] = 1.0
    return seed


def target() -> torch.Tensor:
    t = torch.zeros(4, H, W)
    t[:, 3:6, 3:6] = 0.8
    return t


def make(pool_size: int = 16, batch: int = 4, damage: int = 0, rng: int = 0) -> NCAPool:
    settings = PoolSettings(pool_size, batch, rollout_min=3, rollout_max=5, fire_rate=0.5,
                            damage=damage)
    return NCAPool(seed_state(), target(), settings, rng)


def fill_with_distinct_states(pool: NCAPool) -> None:
    """Pool state i is the target scaled by i / pool_size: loss falls as i grows."""
    n = pool.states.shape[0]
    for i in range(n):
        pool.states[i] = 0.0
        pool.states[i, :4] = target() * (i / n)
        pool.states[i, 3, 0, 0] = 1.0  # every state has some life far from the centre


def test_pool_starts_as_seeds_and_a_batch_has_indices_states_and_masks() -> None:
    pool = make()
    assert torch.equal(pool.states, seed_state().expand(16, C, H, W))
    assert pool.pool_diversity() == 0.0
    batch = pool.next_batch()
    index, states, fire = batch["index"], batch["state"], batch["fire"]
    assert index.shape == (4,) and len(set(index.tolist())) == 4  # without replacement
    assert states.shape == (4, C, H, W)
    assert fire.dtype == torch.bool and fire.shape[0] == 4 and fire.shape[2:] == (H, W)
    assert 3 <= fire.shape[1] <= 5
    assert 0.35 < fire.float().mean().item() < 0.65  # fire rate 0.5


def test_the_worst_sample_is_reseeded_and_comes_first() -> None:
    pool = make()
    fill_with_distinct_states(pool)
    batch = pool.next_batch()
    index, states = batch["index"], batch["state"]
    # Sorted worst first: the lowest pool index (farthest from the target) leads.
    assert index.tolist() == sorted(index.tolist())
    assert torch.equal(states[0], seed_state())
    for i in range(1, 4):
        assert torch.equal(states[i], pool.states[index[i]])


def test_damage_hits_only_the_best_samples() -> None:
    pool = make(damage=2)
    fill_with_distinct_states(pool)
    batch = pool.next_batch()
    index, states = batch["index"], batch["state"]
    assert torch.equal(states[0], seed_state())
    assert torch.equal(states[1], pool.states[index[1]])  # neither worst nor best: untouched
    for i in (2, 3):
        original = pool.states[index[i]]
        erased = (original != 0) & (states[i] == 0)
        assert erased.any(), "a disc was erased"
        # Damage only clears cells: what is left is the original.
        kept = states[i] != 0
        assert torch.equal(states[i][kept], original[kept])


def test_grown_states_return_at_the_next_batch_or_state_dict() -> None:
    pool = make()
    batch = pool.next_batch()
    grown = torch.rand(4, C, H, W)
    pool.put_back(batch["index"], grown)
    before = pool.states.clone()
    assert torch.equal(pool.states, before)  # staged, not yet applied
    state = pool.state_dict()
    assert torch.equal(state["states"][batch["index"]], grown)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[batch["index"]] = False
    assert torch.equal(state["states"][untouched], before[untouched])


def test_a_retried_step_overwrites_its_first_attempt() -> None:
    pool = make()
    batch = pool.next_batch()
    pool.put_back(batch["index"][:2], torch.full((2, C, H, W), 1.0))  # half of a failed try
    pool.put_back(batch["index"], torch.full((4, C, H, W), 2.0))  # the retry, whole batch
    assert (pool.state_dict()["states"][batch["index"]] == 2.0).all()


def test_without_a_pool_every_batch_is_seeds_and_nothing_returns() -> None:
    pool = make(pool_size=0)
    batch = pool.next_batch()
    assert (batch["index"] == -1).all()
    assert torch.equal(batch["state"], seed_state().expand(4, C, H, W))
    pool.put_back(batch["index"], torch.rand(4, C, H, W))
    assert pool.state_dict()["states"].shape == (0, C, H, W)
    assert pool.pool_diversity() == 0.0


def test_state_round_trip_continues_identically() -> None:
    a = make(damage=1, rng=3)
    fill_with_distinct_states(a)
    a.put_back(a.next_batch()["index"], torch.rand(4, C, H, W))
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    b = make(damage=1, rng=99)
    b.load_state_dict(saved)
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
        a.put_back(x["index"], x["state"] * 0.5)
        b.put_back(y["index"], y["state"] * 0.5)
    assert torch.equal(a.state_dict()["states"], b.state_dict()["states"])


def test_loading_a_pool_of_another_shape_is_refused() -> None:
    state = make(pool_size=8).state_dict()
    with pytest.raises(CheckpointError, match="another nca section"):
        make(pool_size=16).load_state_dict(state)


def test_losses_and_diversity() -> None:
    states = torch.zeros(2, C, H, W)
    states[1, :4] = target()
    losses = sample_losses(states, target())
    assert losses[1] == 0 and losses[0] == pytest.approx(0.64 * 9 / 81)
    assert diversity(states[:1]) == 0.0
    # std across two states is |a - b| / sqrt(2) per value; mean over cells and RGBA channels.
    assert diversity(states) == pytest.approx((0.8 / 2**0.5) * 9 / 81, rel=1e-5)
