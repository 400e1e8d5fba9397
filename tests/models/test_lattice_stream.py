"""The lattice as stream chunks: chained the way the executor runs them, they are the forward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from kiln.models.lattice import LatticeOutput, LatticeShape
from kiln.models.lattice_adapter import AdaptedLattice
from kiln.streaming.chunks import StreamableModel, StreamChunk, build_plan

SMALL = {
    "depth": 3, "height": 3, "width": 4, "channels": 4, "memory": 2, "hidden": 6,
    "input_dim": 12, "output_dim": 12, "mix_init": 0.5,
}
ENCODER = 5
BATCH = 2

# Each option on its own, then a few together.
CASES = [
    {},
    {"sharing": "per_depth"},
    {"sharing": "all"},
    {"boundary": "replicate"},
    {"boundary": "periodic"},
    {"inject": "every_step"},
    {"memory": 0},
    {"fire_rate": 0.5},
    {"alive_threshold": 0.0},
    {"input_mode": "linear", "output_mode": "linear", "steps": 3},
    {"sharing": "all", "boundary": "periodic", "inject": "every_step", "fire_rate": 0.6},
    {"sharing": "per_depth", "boundary": "replicate", "memory": 0, "alive_threshold": -0.3,
     "fire_rate": 0.7, "steps": 1},
    {"inject": "every_step", "alive_threshold": 0.0, "fire_rate": 0.5, "boundary": "periodic"},
]


def case_id(changes: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in changes.items()) or "default"


def make(seed: int = 0, **changes: Any) -> AdaptedLattice:
    """A small adapted lattice with every parameter randomised."""
    torch.manual_seed(seed)
    model = AdaptedLattice(LatticeShape(**{**SMALL, **changes}), ENCODER)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def inputs(model: AdaptedLattice, with_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    s = model.lattice.shape
    state = torch.randn(BATCH, s.depth, s.height, s.width, s.channels + s.memory, generator=g)
    return torch.randn(BATCH, ENCODER, generator=g), state if with_state else None


def gens() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(7 + i) for i in range(BATCH)]


@contextlib.contextmanager
def bound(chunk: StreamChunk) -> Iterator[None]:
    """Run with each rows-parameter holding just its rows, as the executor does."""
    full = {p: p.data for p in chunk.rows}
    try:
        for p, rows in chunk.rows.items():
            p.data = full[p][rows.start : rows.stop]
        yield
    finally:
        for p, data in full.items():
            p.data = data


def chain(chunks: list[StreamChunk], *args: Any, **kwargs: Any) -> Any:
    """The chunks' forward, in order; returns every boundary (the chunks' inputs) and the end."""
    with bound(chunks[0]):
        x = chunks[0].module(*args, **kwargs)
    bounds = [(args, kwargs), x]
    for chunk in chunks[1:]:
        with bound(chunk):
            x = chunk.module(x)
        bounds.append(x)
    return bounds


def _floats(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if torch.is_tensor(t) and t.is_floating_point()]


def chain_grads(
    model: nn.Module, chunks: list[StreamChunk], loss: Callable[[Any], torch.Tensor], *args: Any,
    **kwargs: Any,
) -> tuple[dict[nn.Parameter, torch.Tensor], list[torch.Tensor | None]]:
    """Gradients the executor's way: forward without a graph, keeping the boundaries; then each
    chunk in reverse, recomputed from its boundary with its rows bound, back-propagated, its
    parameters' gradients (rows: just those rows) added into full-size ones.

    Returns the gradients per parameter and those of the first chunk's floating-point inputs.
    """
    with torch.no_grad():
        bounds = chain(chunks[:-1], *args, **kwargs)
    grads = {p: torch.zeros_like(p) for p in model.parameters()}
    upstream: list[torch.Tensor | None] = []
    for j in range(len(chunks) - 1, -1, -1):
        chunk = chunks[j]
        leaves = tree_map(
            lambda t: t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
            else t,
            bounds[j],
        )
        with bound(chunk):
            out = chunk.module(*leaves[0], **leaves[1]) if j == 0 else chunk.module(leaves)
            if j == len(chunks) - 1:
                loss(out).backward()
            else:
                pairs = [(o, u) for o, u in zip(_floats(out), upstream, strict=True)
                         if u is not None and o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [u for _, u in pairs])
            for p in chunk.module.parameters():
                if p.grad is not None:
                    rows = chunk.rows.get(p)
                    target = grads[p] if rows is None else grads[p][rows.start : rows.stop]
                    target += p.grad
                    p.grad = None
        upstream = [t.grad for t in _floats(leaves)]
    return grads, upstream


def scalar_loss(out: LatticeOutput) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.0, out.state.numel()).view(out.state.shape)
    return out.output.square().sum() + (out.state * weights).sum()


# ---- chain == forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("changes", CASES, ids=case_id)
@pytest.mark.parametrize("with_state", [False, True], ids=["empty", "state"])
def test_chained_chunks_equal_the_forward(changes: dict[str, Any], with_state: bool) -> None:
    model = make(**changes)
    embedding, state = inputs(model, with_state)
    with torch.no_grad():
        expected = model(embedding, state, generators=gens())
        got = chain(model.stream_chunks(), embedding, state, generators=gens())[-1]
    assert isinstance(got, LatticeOutput)
    if model.lattice.shape.sharing == "none":
        # A slice's cells go through the same operations as in the whole-lattice step, on the
        # same numbers: bit for bit.
        assert torch.equal(got.output, expected.output)
        assert torch.equal(got.state, expected.state)
    else:
        # With one weight group per chunk, the (T, T) token-mixing bmm runs on one batch entry
        # (or a narrower one) and BLAS takes another path: equal to the last bit or two.
        torch.testing.assert_close(got.output, expected.output, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.state, expected.state, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("changes", CASES, ids=case_id)
def test_chained_gradients_equal_the_in_memory_ones(changes: dict[str, Any]) -> None:
    model = make(**changes)
    embedding, state = inputs(model, with_state=True)
    grads, (d_embedding, d_state) = chain_grads(
        model, model.stream_chunks(), scalar_loss, embedding, state, generators=gens()
    )
    embedding.requires_grad_()
    state.requires_grad_()
    scalar_loss(model(embedding, state, generators=gens())).backward()
    # Sums in another order (per slice, then across slices): float error relative to the scale.
    pairs = [*((grads[p], p.grad) for p in model.parameters()),
             (d_embedding, embedding.grad), (d_state, state.grad)]
    for got, expected in pairs:
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


# ---- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [None, 1, 4])
def test_chunk_names_and_count(steps: int | None) -> None:
    model = make(steps=steps)
    shape = model.lattice.shape
    names = [c.name for c in model.stream_chunks()]
    assert len(names) == 2 + shape.num_steps * shape.depth
    steps_names = [f"step{t}.z{z}" for t in range(shape.num_steps) for z in range(shape.depth)]
    assert names == ["input", *steps_names, "output"]
    assert isinstance(model, StreamableModel)


@pytest.mark.parametrize("sharing", ["none", "per_depth"])
def test_rows_tile_every_cell_parameter_once_per_step(sharing: str) -> None:
    model = make(sharing=sharing, steps=2)
    cells = list(model.lattice.cell.parameters())
    chunks = model.stream_chunks()
    assert not chunks[0].rows and not chunks[-1].rows
    for t in range(2):
        per_step = [c for c in chunks if c.name.startswith(f"step{t}.")]
        for p in cells:
            covered = [i for c in per_step for i in c.rows[p]]
            assert covered == list(range(p.shape[0]))
        assert all(set(c.rows) == set(cells) for c in per_step)


def test_one_shared_group_is_borrowed_whole() -> None:
    model = make(sharing="all")
    cells = set(model.lattice.cell.parameters())
    steps = model.stream_chunks()[1:-1]
    assert all(not c.rows and set(c.module.parameters()) == cells for c in steps)


def test_ownership_input_owns_the_adapter_and_the_output_borrows_it() -> None:
    model = make()
    plan = build_plan(model)
    assert plan.owner["adapter.weight"] == 0 and plan.owner["lattice.write_w"] == 0
    assert "adapter.weight" in plan.used[plan.last]
    assert plan.owner["lattice.read_w"] == plan.last
    assert all(plan.owner[n] >= 1 for n in plan.params if n.startswith("lattice.cell."))


def test_a_slice_refuses_unbound_cell_weights() -> None:
    model = make()
    chunks = model.stream_chunks()
    flow = chunks[0].module(torch.randn(BATCH, ENCODER))
    with pytest.raises(RuntimeError, match=r"bind the chunk's StreamChunk\.rows"):
        chunks[1].module(flow)
