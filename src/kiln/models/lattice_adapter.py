"""The lattice as the lattice job trains it: a trainable adapter from the teacher's embedding
size to the lattice's face, in front of the lattice itself.

The adapter is part of the model, so it is optimised, checkpointed and exported with the cells.
It maps a teacher embedding (any size E) to one value per front-face cell (H*W; 225 for the
default 15 x 15 face); its weights start as N(0, 1), so a unit-norm teacher vector becomes a face
of values with about unit spread, the scale the cells were initialised for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kiln.models.lattice import Lattice, LatticeOutput, LatticeShape
from kiln.models.lattice_stream import lattice_chunks
from kiln.streaming.chunks import StreamChunk


def seed_state(shape: LatticeShape, scale: float) -> torch.Tensor:
    """The state a lattice starts from, (D, H, W, C + M): visible channels +scale, -scale, ...

    An all-zero state is a poor start for deep lattices: LayerNorm of an all-zero token has
    slope 1/sqrt(eps) (316 at eps 1e-5), so every empty cell the gradient passes through
    multiplies it by about that much; through 10 propagation steps gradients reach 1e15. A state
    whose channels alternate in sign has zero mean and variance scale**2 in every token, so the
    normalisation is well conditioned from the first step. Memory channels start at zero.
    ``scale`` 0 gives the empty lattice.
    """
    state = torch.zeros(shape.depth, shape.height, shape.width, shape.channels + shape.memory)
    signs = torch.tensor([1.0, -1.0]).repeat((shape.channels + 1) // 2)[: shape.channels]
    state[..., : shape.channels] = scale * signs
    return state


class AdaptedLattice(nn.Module):
    """Teacher embedding (B, E) -> adapter -> lattice -> back-face output (B, H*W)."""

    def __init__(self, shape: LatticeShape, encoder_dim: int) -> None:
        super().__init__()
        self.lattice = Lattice(shape)
        self.adapter = nn.Linear(encoder_dim, shape.input_dim)
        with torch.no_grad():
            self.adapter.weight.normal_(0.0, 1.0)
            self.adapter.bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The matrices (for weight decay): the adapter's and the lattice's own."""
        return [self.adapter.weight, *self.lattice.decayed_parameters()]

    def surface(self, embedding: torch.Tensor) -> torch.Tensor:
        """A teacher embedding (B, E) as a face of values (B, H*W)."""
        return self.adapter(embedding)

    def forward(
        self,
        embedding: torch.Tensor,
        state: torch.Tensor | None = None,
        *,
        generators: Sequence[torch.Generator] | None = None,
    ) -> LatticeOutput:
        """Question embedding (B, E) [, state (B, D, H, W, K)] -> output (B, H*W), final state."""
        return self.lattice(self.surface(embedding), state, generators=generators)

    def stream_chunks(self) -> list[StreamChunk]:
        """Input (adapter and front face), one chunk per depth slice and step, output.

        Chained, they are ``forward``; see ``kiln.models.lattice_stream``.
        """
        return lattice_chunks(self.lattice, self.adapter)
