"""Growing NCA: size, zero-initialised start, perception filters, alive masking, randomness."""

from __future__ import annotations

import pytest
import torch

from kiln.models.nca import NCA, NCAShape, damage, grow, perception_kernels


def make(seed: int = 0, **changes: object) -> NCA:
    torch.manual_seed(seed)
    return NCA(NCAShape(**changes))


def with_random_update(model: NCA) -> NCA:
    with torch.no_grad():
        model.out.weight.normal_(0.0, 0.1)
    return model


def gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_parameter_count_is_about_8k() -> None:
    model = make()
    # 48 -> 128 (6,144 + 128) and 128 -> 16 (2,048 + 16); the fixed filters are not parameters.
    assert model.num_parameters() == NCAShape().num_parameters() == 8_336
    assert "kernels" not in model.state_dict()


def test_zero_initialised_update_makes_the_first_step_the_identity() -> None:
    model = make()
    assert model.out.weight.abs().sum() == 0 and model.out.bias.abs().sum() == 0
    seed = model.seed_state(2, 9, 9)
    assert torch.equal(model.step(seed, gen()), seed)
    live = torch.rand(2, 16, 9, 9, generator=gen(1)) + 0.2  # every alpha above 0.1
    assert torch.equal(model(live, 3, generator=gen()), live)


def test_seed_state_and_rgba() -> None:
    seed = make().seed_state(3, 8, 10)
    assert seed.shape == (3, 16, 8, 10)
    assert seed.sum() == 3 * 13  # channels 3..15 of the centre cell
    assert (seed[:, 3:, 4, 5] == 1).all()
    assert torch.equal(NCA.rgba(seed), seed[:, :4])


def test_perception_kernels() -> None:
    k = perception_kernels(2)
    assert k.shape == (6, 1, 3, 3)
    identity = torch.zeros(3, 3)
    identity[1, 1] = 1
    sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8
    for c in range(2):
        assert torch.equal(k[3 * c, 0], identity)
        assert torch.equal(k[3 * c + 1, 0], sobel_x)
        assert torch.equal(k[3 * c + 2, 0], sobel_x.t())


def test_perception_of_ramps() -> None:
    model = make(channels=4)
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    state = torch.stack((xs, ys, 2 * xs + ys, torch.ones(6, 7))).unsqueeze(0)  # (1, 4, 6, 7)
    p = model.perceive(state)[0]  # (12, 6, 7)
    inner = (slice(1, -1), slice(1, -1))
    assert torch.equal(p[0::3], state[0])  # identity channels
    # d/dx and d/dy per channel (interior; zero padding bends the edges).
    for c, (gx, gy) in enumerate(((1, 0), (0, 1), (2, 1), (0, 0))):
        assert torch.allclose(p[3 * c + 1][inner], torch.full((4, 5), float(gx)))
        assert torch.allclose(p[3 * c + 2][inner], torch.full((4, 5), float(gy)))


def test_periodic_boundary_wraps_perception() -> None:
    model = make(channels=4, boundary="periodic")
    state = torch.zeros(1, 4, 5, 5)
    state[0, 0, 2, 0] = 1.0  # left edge: its right-hand gradient shows up on the right edge
    p = model.perceive(state)[0]
    assert p[1, 2, 4] > 0 and p[1, 2, 1] < 0


def test_alive_masking_clears_cells_without_a_live_neighbour() -> None:
    model = make()  # zero update: only the mask changes anything
    state = torch.zeros(1, 16, 9, 9)
    state[0, 4:, 1, 1] = 1.0  # content, but alpha 0.05: dead, nothing alive nearby
    state[0, 3, 1, 1] = 0.05
    state[0, 3, 6, 6] = 0.2  # alive
    state[0, 4:, 7, 7] = 1.0  # dead itself, but diagonal to a live cell: kept
    new = model.step(state, gen())
    assert new[0, :, 1, 1].abs().sum() == 0
    assert torch.equal(new[0, :, 7, 7], state[0, :, 7, 7])
    assert new[0, 3, 6, 6] == 0.2


def test_fire_rate_masks_come_from_the_generator() -> None:
    model = with_random_update(make(alive_threshold=None))
    state = torch.rand(4, 16, 12, 12, generator=gen(2))
    with pytest.raises(ValueError, match="Generator"):
        model.step(state)
    new = model.step(state, gen(9))
    changed = (new != state).any(dim=1, keepdim=True)  # (B, 1, H, W)
    assert torch.equal(changed, torch.rand(4, 1, 12, 12, generator=gen(9)) < 0.5)
    assert torch.equal(model.step(state, gen(9)), new)
    every = with_random_update(make(alive_threshold=None, fire_rate=1.0))
    assert (every.step(state) != state).any(dim=1).all()


def test_given_fire_masks_replace_the_drawn_ones() -> None:
    model = with_random_update(make(alive_threshold=None))
    state = torch.rand(2, 16, 8, 8, generator=gen(2))
    fire = torch.rand(2, 3, 8, 8, generator=gen(3)) < 0.5  # (B, steps, H, W)
    out = model(state, 3, fire=fire)  # no generator needed
    expected = state
    for t in range(3):
        expected = model.step(expected, fire=fire[:, t : t + 1])
    assert torch.equal(out, expected)
    one = model.step(state, fire=fire[:, :1])
    changed = (one != state).any(dim=1, keepdim=True)
    assert torch.equal(changed, fire[:, :1])


def test_grow_records_the_asked_steps_reproducibly() -> None:
    model = with_random_update(make())
    seed = model.seed_state(2, 10, 10)
    with torch.no_grad():
        states = grow(model, seed, [0, 3, 5], gen(7))
        again = grow(model, seed, [5], gen(7))
        direct = seed
        g = gen(7)
        for _ in range(5):
            direct = model.step(direct, fire=torch.rand((2, 1, 10, 10), generator=g) < 0.5)
    assert sorted(states) == [0, 3, 5] and states[0] is seed
    assert torch.equal(states[5], again[5]) and torch.equal(states[5], direct)
    assert not torch.equal(states[3], states[5])


def test_gradients_flow_through_a_rollout() -> None:
    model = make()
    out = model(model.seed_state(2, 12, 12), 8, generator=gen())
    NCA.rgba(out).square().sum().backward()
    # Zero-initialised weights still receive gradient: the hidden layer is not zero.
    assert model.out.weight.grad.abs().sum() > 0


def test_checkpointing_gives_the_same_values_and_gradients() -> None:
    results = []
    for flag in (False, True):
        model = with_random_update(make(checkpoint=flag))
        out = model(model.seed_state(2, 10, 10), 5, generator=gen())
        out.square().sum().backward()
        results.append((out.detach(), model.hidden.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1])


def test_damage_erases_one_disc_per_sample_reproducibly() -> None:
    state = torch.ones(3, 16, 32, 32)
    hurt = damage(state, gen(4))
    assert torch.equal(hurt, damage(state, gen(4)))
    erased = (hurt == 0).all(dim=1)  # (B, H, W)
    frac = erased.float().mean(dim=(1, 2))
    assert (frac > 0).all() and (frac < 0.5).all()
    assert not torch.equal(erased[0], erased[1])
    assert ((hurt == 0) | (hurt == 1)).all()


def test_bf16_autocast_runs() -> None:
    model = with_random_update(make())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(model.seed_state(2, 10, 10), 3, generator=gen())
    out.float().square().sum().backward()
    assert model.hidden.weight.grad.abs().sum() > 0
