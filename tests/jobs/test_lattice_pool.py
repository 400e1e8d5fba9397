"""The lattice state pool: sampling, worst-sample replacement, write-back, layouts, state."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.errors import CheckpointError
from kiln.jobs.lattice_pool import LatticePool

SHAPE = (2, 3, 3, 4)  # D, H, W, K
SEED = torch.full(SHAPE, -0.5)


def pool(**changes: object) -> LatticePool:
    settings = {"pool_size": 6, "seed_state": SEED, "num_pairs": 10, "samples": 3, "seed": 1}
    return LatticePool(**{**settings, **changes})


def fill(p: LatticePool) -> None:
    """Give every slot a distinct state and a loss equal to its index."""
    slots = torch.arange(p.pool_size)
    states = torch.arange(p.pool_size, dtype=torch.float32).view(-1, 1, 1, 1, 1) + 1
    p.write_back(slots, states.expand(-1, *SHAPE), slots.float())


def test_batches_hold_distinct_slots_their_states_and_seeds() -> None:
    p = pool(replace_worst=False)
    fill(p)
    batch = p.next_batch()
    slots = batch["slot"]
    assert len(set(slots.tolist())) == 3 and batch["state"].shape == (3, *SHAPE)
    for i, slot in enumerate(slots.tolist()):
        assert torch.all(batch["state"][i] == slot + 1)
    assert batch["pair"].shape == (3,) and batch["seed"].shape == (3,)


def test_worst_slot_of_the_batch_restarts_from_the_seed_state() -> None:
    p = pool()
    first = p.next_batch()  # every slot starts from the seed; no losses yet: nothing replaced
    assert torch.all(first["state"] == -0.5)
    fill(p)
    batch = p.next_batch()
    worst = int(batch["slot"].argmax())  # loss == slot index, so the largest index is worst
    for i, slot in enumerate(batch["slot"].tolist()):
        expected = -0.5 if i == worst else slot + 1
        assert torch.all(batch["state"][i] == expected)
    assert torch.all(p.states[batch["slot"][worst]] != 0)  # the pool itself is untouched


def test_write_back_replaces_the_tensor_so_earlier_state_dicts_stay_valid() -> None:
    p = pool()
    before = p.state_dict()
    p.write_back(torch.tensor([2]), torch.ones(1, *SHAPE), torch.tensor([0.5]))
    assert torch.all(before["states"] == -0.5) and math.isnan(before["losses"][2])
    assert torch.all(p.states[2] == 1) and p.losses[2] == 0.5


def test_pairs_walk_a_seeded_permutation_epoch_by_epoch() -> None:
    p = pool(num_pairs=7, samples=3)
    seen = [p.next_batch()["pair"].tolist() for _ in range(4)]
    assert len(set(seen[0] + seen[1])) == 6  # one epoch: 2 steps of 3, the remainder skipped
    assert set(seen[2] + seen[3]) <= set(range(7))
    assert pool(num_pairs=7, samples=3).next_batch()["pair"].tolist() == seen[0]


def test_channels_first_storage_gives_the_same_batches() -> None:
    a, b = pool(), pool(channels_last=False)
    states = torch.randn(6, *SHAPE)
    for p in (a, b):
        p.write_back(torch.arange(6), states, torch.arange(6.0))
    assert b.states.shape == (6, SHAPE[3], *SHAPE[:3])
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x["state"], y["state"]) and torch.equal(x["slot"], y["slot"])
    assert a.diversity() == pytest.approx(b.diversity())


def test_state_dict_round_trip_continues_identically() -> None:
    a = pool()
    fill(a)
    a.next_batch()
    b = pool()
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("changes", [{"pool_size": 5}, {"channels_last": False}])
def test_a_pool_saved_under_other_settings_is_a_checkpoint_error(changes: dict) -> None:
    """A user error (an edited config snapshot), so a KilnError naming the keys, no traceback."""
    saved = pool().state_dict()
    with pytest.raises(CheckpointError) as err:
        pool(**changes).load_state_dict(saved)
    for key in ("lattice.pool_size", "lattice.channels_last_3d", "config_snapshot.yaml"):
        assert key in str(err.value)


def test_diversity_is_zero_for_identical_states_and_grows_with_spread() -> None:
    p = pool()
    assert p.diversity() == 0.0
    fill(p)
    assert p.diversity() == pytest.approx(torch.arange(1.0, 7.0).std(unbiased=False).item())


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="pool holds 2"):
        pool(pool_size=2)
    with pytest.raises(ValueError, match="dialogue pairs but there are 2"):
        pool(num_pairs=2)
