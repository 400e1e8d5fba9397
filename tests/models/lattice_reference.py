"""A straightforward per-cell reference of ``kiln.models.lattice``: a Python loop over cells.

Written independently of the batched code (explicit neighbour coordinates, one small gMLP call per
cell, reading that cell's slice of the stacked weights) so the two can be compared to float
tolerance, and timed against each other in ``benchmarks/lattice.py``. It draws random numbers in
the same order as the batched lattice: per step, one ``torch.rand((D, H, W))`` from each sample's
generator when fire_rate < 1.
Not part of the package: tests and benchmarks only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kiln.models.lattice import Lattice

# Token order: the cell, then z-1, z+1, y-1, y+1, x-1, x+1.
OFFSETS = ((0, 0, 0), (-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))


Cells = list[list[list[torch.Tensor]]]


def cell_views(state: torch.Tensor) -> Cells:
    """State (B, D, H, W, K) as nested lists [z][y][x] of per-cell (B, K) views.

    Nested ``unbind`` gives every cell its view at once, and its backward is one stack per level.
    Indexing ``state[:, z, y, x]`` per cell would allocate a gradient of the whole state for each
    read in backward: a cost quadratic in the number of cells that no honest loop would pay.
    """
    planes = state.permute(1, 2, 3, 0, 4).unbind(0)  # D x (H, W, B, K)
    return [[row.unbind(0) for row in plane.unbind(0)] for plane in planes]


def _neighbour(cells: Cells, z: int, y: int, x: int, boundary: str) -> torch.Tensor:
    """The (B, K) state of the cell at (z, y, x), which may lie outside the grid."""
    d, h, w = len(cells), len(cells[0]), len(cells[0][0])
    inside = 0 <= z < d and 0 <= y < h and 0 <= x < w
    if not inside:
        if boundary == "zero":
            return torch.zeros_like(cells[0][0][0])
        if boundary == "replicate":
            z, y, x = min(max(z, 0), d - 1), min(max(y, 0), h - 1), min(max(x, 0), w - 1)
        else:
            z, y, x = z % d, y % h, x % w
    return cells[z][y][x]


PARAMS = (
    "norm_w", "norm_b", "value_w", "value_b", "gate_w", "gate_b", "gate_norm_w", "gate_norm_b",
    "mix_w", "mix_b", "down_w", "down_b", "mem_in",
)


def cell_weights(lattice: Lattice) -> list[dict[str, torch.Tensor]]:
    """One dict of weights per group, like the original's separate cell modules.

    ``unbind`` gives per-group views whose gradients flow back to the stacked parameters through
    a single stack in backward (indexing per cell would allocate a full-size gradient per cell).
    """
    cell = lattice.cell
    names = [n for n in PARAMS if getattr(cell, n) is not None]
    parts = [getattr(cell, n).unbind(0) for n in names]
    return [dict(zip(names, group, strict=True)) for group in zip(*parts, strict=True)]


def cell_delta(
    lattice: Lattice, wt: dict[str, torch.Tensor], tokens: torch.Tensor, memory: torch.Tensor | None
) -> torch.Tensor:
    """One cell's gMLP with weights ``wt``: tokens (B, 7, C), memory (B, M) -> (B, C + M)."""
    s = lattice.shape
    c, m, f, eps = s.channels, s.memory, s.hidden, s.layernorm_eps
    if memory is not None:
        own = tokens[:, 0] + memory @ wt["mem_in"]
        tokens = torch.cat((own[:, None], tokens[:, 1:]), dim=1)
    h = F.layer_norm(tokens, (c,), wt["norm_w"], wt["norm_b"], eps)
    u = torch.cat((wt["value_w"], wt["gate_w"]), dim=1)  # U: (C, 2F)
    z = F.gelu(h @ u + torch.cat((wt["value_b"], wt["gate_b"])))  # (B, 7, 2F)
    z1, z2 = z[..., :f], z[..., f:]
    z2 = F.layer_norm(z2, (f,), wt["gate_norm_w"], wt["gate_norm_b"], eps)
    gate = torch.einsum("st,btf->bsf", wt["mix_w"], z2) + wt["mix_b"][None, :, None]
    out = (z1 * gate).mean(dim=1) @ wt["down_w"] + wt["down_b"]  # (B, C + 2M)
    if memory is None:
        return out
    cand, write = out[:, c : c + m], out[:, c + m :]
    return torch.cat((out[:, :c], torch.sigmoid(write) * (torch.tanh(cand) - memory)), dim=1)


def _alive(lattice: Lattice, cells: Cells, z: int, y: int, x: int) -> torch.Tensor:
    """(B,) bool: max alpha over the cell and its six neighbours exceeds the threshold."""
    s = lattice.shape
    alphas = [
        _neighbour(cells, z + dz, y + dy, x + dx, s.boundary)[:, s.alive_channel]
        for dz, dy, dx in OFFSETS
    ]
    return torch.stack(alphas).amax(dim=0) > s.alive_threshold


def step(
    lattice: Lattice,
    state: torch.Tensor,
    generators: Sequence[torch.Generator] | None,
    weights: list[dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """One synchronous step, cell by cell: state (B, D, H, W, K) -> new state."""
    s = lattice.shape
    weights = weights if weights is not None else cell_weights(lattice)
    b, d, h, w, _ = state.shape
    c = s.channels
    fire = None
    if s.fire_rate < 1.0:
        draws = [torch.rand((d, h, w), generator=g, device=state.device) for g in generators]
        fire = torch.stack(draws) < s.fire_rate  # (B, D, H, W)
    cells = cell_views(state)
    new_cells = []
    for z in range(d):
        for y in range(h):
            for x in range(w):
                tokens = torch.stack(
                    [
                        _neighbour(cells, z + dz, y + dy, x + dx, s.boundary)[:, :c]
                        for dz, dy, dx in OFFSETS
                    ],
                    dim=1,
                )  # (B, 7, C)
                memory = cells[z][y][x][:, c:] if s.memory else None
                delta = cell_delta(lattice, weights[s.group_of(z, y, x)], tokens, memory)
                if fire is not None:
                    delta = delta * fire[:, z, y, x, None].to(delta.dtype)
                new = cells[z][y][x] + delta  # (B, K)
                new_cells.append(new)
    new_state = torch.stack(new_cells, dim=1).view_as(state)
    if s.alive_threshold is None:
        return new_state
    new_views = cell_views(new_state)
    masks = [
        (_alive(lattice, cells, z, y, x) & _alive(lattice, new_views, z, y, x))
        for z in range(d)
        for y in range(h)
        for x in range(w)
    ]
    mask = torch.stack(masks, dim=1).view(b, d, h, w, 1)
    return new_state * mask.to(new_state.dtype)


def advance(
    lattice: Lattice,
    state: torch.Tensor,
    steps: int,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    weights = cell_weights(lattice)
    for _ in range(steps):
        state = step(lattice, state, generators, weights)
    return state


def forward(
    lattice: Lattice,
    x: torch.Tensor,
    state: torch.Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``Lattice.forward``: (B, input_dim) -> output (B, output_dim), final state."""
    s = lattice.shape
    b = x.shape[0]
    if state is None:
        state = lattice.initial_state(b)
    face = s.height * s.width
    if s.input_mode == "direct":
        front = x[:, :, None] * lattice.write_w[None]  # (B, H*W, C)
    else:
        front = lattice.write(x).view(b, face, s.channels)
    front = F.pad(front.view(b, s.height, s.width, s.channels), (0, s.memory))

    def inject(st: torch.Tensor) -> torch.Tensor:
        return torch.cat(((st[:, 0] + front)[:, None], st[:, 1:]), dim=1)

    if s.inject == "once":
        state = advance(lattice, inject(state), s.num_steps, generators)
    else:
        weights = cell_weights(lattice)
        for _ in range(s.num_steps):
            state = step(lattice, inject(state), generators, weights)
    back = state[:, -1, :, :, : s.channels].reshape(b, face, s.channels)
    if s.output_mode == "direct":
        out = (back * lattice.read_w[None]).sum(-1) + lattice.read_b
    else:
        out = lattice.read(back.reshape(b, -1))
    return out, state
