"""The 3D cellular lattice: per-cell weights, locality, the per-cell reference, dynamics, counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kiln.models.lattice import Lattice, LatticeShape, neighbours
from kiln.models.lattice_cell import cell_parameter_count

# The reference is a plain module next to this file (also used by benchmarks/lattice.py).
_spec = importlib.util.spec_from_file_location(
    "lattice_reference", Path(__file__).with_name("lattice_reference.py")
)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

SMALL = {
    "depth": 3, "height": 4, "width": 5, "channels": 4, "memory": 2, "hidden": 6,
    "input_dim": 20, "output_dim": 20, "mix_init": 0.5,
}


def make(seed: int = 0, **changes: object) -> Lattice:
    """A small lattice with every parameter randomised (so no term is trivially 0 or 1)."""
    torch.manual_seed(seed)
    model = Lattice(LatticeShape(**{**SMALL, **changes}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def random_state(model: Lattice, batch: int = 2, seed: int = 1) -> torch.Tensor:
    s = model.shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, s.depth, s.height, s.width, s.channels + s.memory, generator=g)


def gens(batch: int = 2, seed: int = 7) -> list[torch.Generator]:
    """One fire-mask generator per sample, as the lattice takes them."""
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


# ---- counts and shapes ---------------------------------------------------------------------------


def test_default_size_parameter_count() -> None:
    shape = LatticeShape()
    assert shape.cells == 2475 and shape.groups == 2475 and shape.num_steps == 10
    assert shape.params_per_cell() == 24_984
    # 2475 cells x 24,984 + direct writer (225 x 32) + direct reader (225 x 32 + 225).
    assert shape.num_parameters() == 2475 * 24_984 + 7200 + 7425 == 61_850_025
    with torch.device("meta"):  # count without allocating 247 MB
        assert Lattice(shape).num_parameters() == 61_850_025


def test_cell_parameter_formula_by_hand() -> None:
    # C=4, M=2, F=6: LN 8, U 2*(24+6)=60, gate LN 12, mixing 49+7, V 7*8=56, memory read 8.
    assert cell_parameter_count(4, 2, 6) == 8 + 60 + 12 + 56 + 56 + 8 == 200
    assert cell_parameter_count(4, 0, 6) == 8 + 60 + 12 + 56 + 7 * 4 == 164


@pytest.mark.parametrize("sharing", ["none", "per_depth", "all"])
@pytest.mark.parametrize("io", ["direct", "linear"])
def test_parameter_count_matches_module(sharing: str, io: str) -> None:
    shape = LatticeShape(**{**SMALL, "sharing": sharing, "input_mode": io, "output_mode": io})
    model = Lattice(shape)
    assert model.num_parameters() == shape.num_parameters()
    assert model.cell.value_w.shape[0] == {"none": 60, "per_depth": 3, "all": 1}[sharing]


def test_shapes_and_initial_state() -> None:
    model = make(output_mode="linear", output_dim=7)
    out, state = model(torch.randn(3, 20))
    assert out.shape == (3, 7)
    assert state.shape == (3, 3, 4, 5, 6)
    assert model.initial_state(3).shape == (3, 3, 4, 5, 6)
    assert model.advance(state, 2).shape == state.shape


def test_invalid_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="input_dim == height"):
        LatticeShape(**{**SMALL, "input_dim": 21})
    with pytest.raises(ValueError, match="sharing"):
        LatticeShape(**{**SMALL, "sharing": "some"})
    with pytest.raises(ValueError, match="fire_rate"):
        LatticeShape(**{**SMALL, "fire_rate": 0.0})


def test_neighbour_boundaries() -> None:
    x = torch.arange(3.0).view(3, 1, 1)  # a column along z
    zm = {m: neighbours(x, m)[1].flatten().tolist() for m in ("zero", "replicate", "periodic")}
    assert zm == {"zero": [0, 0, 1], "replicate": [0, 0, 1], "periodic": [2, 0, 1]}
    zp = {m: neighbours(x, m)[2].flatten().tolist() for m in ("zero", "replicate", "periodic")}
    assert zp == {"zero": [1, 2, 0], "replicate": [1, 2, 2], "periodic": [1, 2, 0]}


# ---- per-cell weights and locality ---------------------------------------------------------------


def test_cells_have_their_own_weights() -> None:
    torch.manual_seed(0)
    model = Lattice(LatticeShape(**SMALL))
    w = model.cell.value_w
    assert not torch.equal(w[0], w[1])
    assert not torch.equal(model.cell.mix_w[0], model.cell.mix_w[1])


@pytest.mark.parametrize("steps", [1, 3])
def test_one_cells_weights_only_reach_manhattan_distance(steps: int) -> None:
    # A cell's weights act on its own update in step 1; each later step carries the change one
    # cell further: after t steps it is confined to Manhattan distance t - 1 (1 step: the cell).
    model = make(depth=5, height=5, width=5, input_dim=25, output_dim=25)
    state = random_state(model)
    before = model.advance(state, steps)
    z0, y0, x0 = 2, 1, 3
    g = model.shape.group_of(z0, y0, x0)
    with torch.no_grad():
        for p in model.cell.parameters():
            p[g] += 0.5 * torch.randn_like(p[g])
    diff = (model.advance(state, steps) - before).abs().amax(dim=(0, 4))  # (D, H, W)
    zz, yy, xx = torch.meshgrid(*(torch.arange(5),) * 3, indexing="ij")
    dist = (zz - z0).abs() + (yy - y0).abs() + (xx - x0).abs()
    assert diff[dist >= steps].max() == 0
    assert diff[z0, y0, x0] > 0
    assert (diff[dist == steps - 1] > 0).all()


def test_per_depth_weights_reach_their_slice_only() -> None:
    model = make(sharing="per_depth")
    state = random_state(model)
    before = model.advance(state, 1)
    with torch.no_grad():
        model.cell.value_w[1] += 0.5
    diff = (model.advance(state, 1) - before).abs().amax(dim=(0, 2, 3, 4))  # (D,)
    assert diff[0] == 0 and diff[2] == 0 and diff[1] > 0


# ---- the per-cell reference ----------------------------------------------------------------------


@pytest.mark.parametrize("sharing", ["none", "per_depth", "all"])
@pytest.mark.parametrize("boundary", ["zero", "replicate", "periodic"])
def test_batched_matches_per_cell_reference(sharing: str, boundary: str) -> None:
    model = make(
        sharing=sharing, boundary=boundary, steps=2, fire_rate=0.6, alive_threshold=0.0
    )
    x, state = torch.randn(2, 20), random_state(model)
    out, final = model(x, state, generators=gens())
    (out.square().mean() + final.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out_ref, final_ref = ref.forward(model, x, state, gens())
    (out_ref.square().mean() + final_ref.square().mean()).backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert (final_ref == 0).all(dim=-1).any(), "alive masking never triggered"


@pytest.mark.parametrize(
    "changes",
    [
        {"inject": "every_step", "input_mode": "linear", "output_mode": "linear"},
        {"memory": 0, "boundary": "periodic"},
    ],
)
def test_reference_agrees_on_other_options(changes: dict[str, object]) -> None:
    model = make(steps=3, **changes)
    x = torch.randn(2, 20)
    out, final = model(x)
    out_ref, final_ref = ref.forward(model, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)


# ---- dynamics ------------------------------------------------------------------------------------


def test_input_reaches_output_and_every_cell_gets_gradient() -> None:
    # Depth 3: two steps to the back face, one more for the front cells, one more for memory
    # (it starts at zero, so its read weights act from the second step on).
    model = make(steps=4)
    x = torch.randn(2, 20, requires_grad=True)
    out, _ = model(x)
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        per_group = p.grad.abs().flatten(1).sum(1) if name.startswith("cell.") else p.grad.abs()
        assert (per_group > 0).all(), name


def test_state_must_be_detached_between_optimisation_steps() -> None:
    model = make()
    x = torch.randn(2, 20)
    out, state = model(x)
    out.sum().backward()
    out, _ = model(x, state)  # the old graph is freed: backward would walk into it again
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
    out, state2 = model(x, state.detach())
    out.sum().backward()
    assert not state2.detach().requires_grad


def test_fire_rate_one_updates_every_cell() -> None:
    model = make()
    state = random_state(model)
    changed = (model.advance(state, 1) != state).any(dim=-1)
    assert changed.all()


def test_fire_rate_masks_come_from_each_samples_generator() -> None:
    model = make(fire_rate=0.5)
    state = random_state(model, batch=4)
    for wrong in (None, torch.Generator(), gens(3)):
        with pytest.raises(ValueError, match=r"one torch\.Generator per sample"):
            model.advance(state, 1, generators=wrong)
    new = model.advance(state, 1, generators=gens(4, seed=3))
    changed = (new != state).any(dim=-1)  # (B, D, H, W)
    expected = torch.stack([torch.rand(changed.shape[1:], generator=g) for g in gens(4, 3)]) < 0.5
    assert torch.equal(changed, expected)
    assert 0.3 < changed.float().mean() < 0.7
    assert torch.equal(model.advance(state, 1, generators=gens(4, seed=3)), new)


def test_a_samples_masks_do_not_depend_on_the_rest_of_its_batch() -> None:
    """Micro-batches (accumulation, an out-of-memory retry) must see the same masks."""
    model = make(fire_rate=0.5, steps=3)
    x, state = torch.randn(4, 20), random_state(model, batch=4)
    out, final = model(x, state, generators=gens(4))
    for part in (slice(0, 2), slice(2, 4), slice(1, 2), slice(3, 4)):
        out_part, final_part = model(x[part], state[part], generators=gens(4)[part])
        torch.testing.assert_close(out_part, out[part], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(final_part, final[part], rtol=1e-6, atol=1e-6)


def test_alive_masking_kills_cells_without_a_live_neighbour() -> None:
    model = make(alive_threshold=0.1)
    state = torch.zeros(1, 3, 4, 5, 6)
    state[..., 1:] = 0.5  # every cell has content, but only one is alive
    state[0, 1, 2, 2, 0] = 1.0
    new = model.advance(state, 1)
    lives = (new != 0).any(dim=-1)[0]  # (D, H, W)
    zz, yy, xx = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    near = (zz - 1).abs() + (yy - 2).abs() + (xx - 2).abs() <= 1
    assert not lives[~near].any()
    assert lives[1, 2, 2]


def test_checkpointing_gives_the_same_values_and_gradients() -> None:
    results = []
    for flag in (False, True):
        model = make(checkpoint=flag, fire_rate=0.5)
        out, _ = model(torch.ones(2, 20), generators=gens())
        out.square().sum().backward()
        results.append((out.detach(), model.cell.value_w.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)


def test_bf16_autocast_runs_and_keeps_the_state_in_fp32() -> None:
    model = make()
    x = torch.randn(2, 20)
    expected, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = model(x)
    assert state.dtype == torch.float32
    out.float().square().sum().backward()
    assert model.cell.value_w.grad.abs().sum() > 0
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)
