"""The lattice as stream chunks: it trains out of core one depth slice of one step at a time.

Chunks, in forward order (``2 + T * D`` of them):

- ``input``: the adapter and the front writer. It takes what the model's forward takes, starts
  from the empty lattice without a state, adds the front face now (inject "once") or carries it
  (inject "every_step"), and draws every step's fire masks.
- ``step{t}.z{z}``: the update of depth slice ``z`` in step ``t``, from the state at the start of
  the step, with slice ``z``'s weights only: for per-cell and per-depth weights the chunk is
  handed those rows of every cell parameter (``StreamChunk.rows``), so each slice's weights are a
  piece of their own that the out-of-core executor stores and moves alone. With one shared group
  (sharing "all") the group is a whole parameter: ``step0.z0`` owns it, every other step borrows
  it. The chunk of the last slice puts the slices' updates together and finishes the step
  (residual, fire mask, alive masking).
- ``output``: reads the back face.

The same ``Lattice`` methods run the in-memory forward, so chaining the chunks is ``forward``.
Between chunks the state travels as a ``LatticeFlow``; its tensors are passed on as they are (the
executor keeps every boundary for the backward, and a tensor shared by many boundaries is stored
once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from kiln.models.lattice import Lattice, LatticeOutput
from kiln.streaming.chunks import StreamChunk


class LatticeFlow(NamedTuple):
    """What passes between the lattice's chunks."""

    state: torch.Tensor  # (D, H, W, B, K): the state at the start of the current step
    front: torch.Tensor | None  # (H, W, B, K): added before every step (inject every_step)
    fire: torch.Tensor | None  # bool (T, D, H, W, B, 1): every step's fire masks; None at rate 1
    deltas: tuple[torch.Tensor, ...]  # the current step's updates so far, (1, H, W, B, K) each


class _Input(nn.Module):
    """Adapter, front face, fire masks: (embedding, state=None, *, generators) -> flow.

    The masks are drawn from the generators when this chunk runs. The executor runs it again in
    the backward (it recomputes every chunk), which may draw different masks; that is harmless,
    since masks carry no gradient and only the first run's masks flow forward.
    """

    def __init__(self, lattice: Lattice, adapter: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.write_w, self.write = lattice.write_w, lattice.write
        # Bound methods, not a submodule: the chunk must own no more than the parameters above.
        self._begin, self._fire_masks = lattice._begin, lattice._fire_masks
        self.steps = lattice.shape.num_steps

    def forward(
        self,
        embedding: torch.Tensor,
        state: torch.Tensor | None = None,
        *,
        generators: Sequence[torch.Generator] | None = None,
    ) -> LatticeFlow:
        s, front = self._begin(self.adapter(embedding), state)
        return LatticeFlow(s, front, self._fire_masks(s, generators, self.steps), ())


class _Slice(nn.Module):
    """Depth slice ``z`` of step ``t``: adds the slice's update to the flow; the last slice ends
    the step."""

    def __init__(self, lattice: Lattice, step: int, z: int) -> None:
        super().__init__()
        self.cell = lattice.cell
        self._inject, self._delta, self._finish = lattice._inject, lattice._delta, lattice._finish
        self.step, self.depths = step, range(z, z + 1)
        self.groups = len(lattice.shape.groups_at(self.depths))
        self.last = z == lattice.shape.depth - 1

    def forward(self, flow: LatticeFlow) -> LatticeFlow:
        held = self.cell.norm_w.shape[0]
        if held != self.groups:  # a clear message instead of a shape error deep in the cell
            raise RuntimeError(
                f"slice {self.depths.start} of step {self.step} runs on {self.groups} cell weight "
                f"group(s), but the cell holds {held}: bind the chunk's StreamChunk.rows first"
            )
        s = flow.state
        if self.depths.start == 0 and flow.front is not None:
            s = self._inject(s, flow.front)  # the state every slice of this step reads
        deltas = (*flow.deltas, self._delta(s, self.depths))
        if not self.last:
            return flow._replace(state=s, deltas=deltas)
        fire = None if flow.fire is None else flow.fire[self.step]
        return flow._replace(state=self._finish(s, torch.cat(deltas), fire), deltas=())


class _Output(nn.Module):
    """Back face -> ``LatticeOutput(output, final state (B, D, H, W, K))``."""

    def __init__(self, lattice: Lattice, adapter: nn.Module) -> None:
        super().__init__()
        self.read_w, self.read_b, self.read = lattice.read_w, lattice.read_b, lattice.read
        self._end = lattice._end
        # Unused here, but registered so that the adapter is borrowed by, and so resident for,
        # the last chunk: the lattice job's loss maps the answer through ``model.surface`` while
        # this chunk's output is being scored.
        self.adapter = adapter

    def forward(self, flow: LatticeFlow) -> LatticeOutput:
        return self._end(flow.state)


def lattice_chunks(lattice: Lattice, adapter: nn.Module) -> list[StreamChunk]:
    """The chunks of ``lattice`` behind ``adapter`` (model input -> lattice input), in order.

    Chained, with each chunk's rows bound as ``StreamChunk.rows`` says, they equal
    ``lattice(adapter(x), state, generators=...)``. ``shape.checkpoint`` plays no part: the
    executor recomputes every chunk in the backward anyway.
    """
    shape = lattice.shape
    cells = list(lattice.cell.parameters())
    chunks = [StreamChunk("input", _Input(lattice, adapter))]
    for t in range(shape.num_steps):
        for z in range(shape.depth):
            # One shared group is one whole parameter: no rows, every slice borrows it.
            groups = shape.groups_at(range(z, z + 1))
            rows = {} if shape.sharing == "all" else dict.fromkeys(cells, groups)
            chunks.append(StreamChunk(f"step{t}.z{z}", _Slice(lattice, t, z), rows))
    chunks.append(StreamChunk("output", _Output(lattice, adapter)))
    return chunks
