"""A layer of neurons: per-layer premodulo input hashing and a vectorised forward.

Neuron ``i`` of a layer reads column ``i % F`` of the layer's input features ``[N, F]`` (so a
single-feature input, like a dataset of plain numbers, feeds every neuron). With a nonzero
``premodulo`` the value is first hashed: ``hash32(feature, i, premodulo)``. The premodulo thus
caps how many distinct inputs a neuron can tell apart (its capacity); 0 leaves inputs as they are.

The forward runs all neurons of the layer at once: their programs are stacked by length and
their filters concatenated into one table with per-neuron offsets (``filter.probe``), cached
until a neuron is replaced. Only output bit 0 of each neuron is used, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from kiln.errors import ConfigError
from kiln.hashtron.combiners import Combiner
from kiln.hashtron.filter import CELLS_PER_BYTE, probe
from kiln.hashtron.hash import MASK32, U32, hash32
from kiln.hashtron.neuron import Neuron


@dataclass(frozen=True)
class _Stack:
    """All neurons of a layer in array form (see module doc)."""

    programs: tuple[tuple[NDArray[np.intp], NDArray[np.uint32], NDArray[np.uint32]], ...]
    tables: NDArray[np.uint8]
    offsets: NDArray[np.int64]
    cells: NDArray[np.int64]


class Layer:
    """Neurons side by side, an input ``premodulo`` and the ``combiner`` that follows (if any)."""

    def __init__(
        self, neurons: Sequence[Neuron], premodulo: int = 0, combiner: Combiner | None = None
    ) -> None:
        if len(neurons) == 0:
            raise ConfigError("a layer needs at least one neuron (width >= 1)")
        if not 0 <= int(premodulo) <= MASK32:
            raise ConfigError(f"premodulo must be in [0, 2**32), got {premodulo}")
        self._neurons = list(neurons)
        self.premodulo = int(premodulo)
        self.combiner = combiner
        self._stack: _Stack | None = None

    @classmethod
    def random(
        cls,
        width: int,
        rng: np.random.Generator,
        premodulo: int = 0,
        combiner: Combiner | None = None,
    ) -> Layer:
        """``width`` fresh random neurons."""
        if width < 1:
            raise ConfigError(f"layer width must be >= 1, got {width}")
        return cls([Neuron.random(rng) for _ in range(width)], premodulo, combiner)

    @property
    def width(self) -> int:
        """Number of neurons."""
        return len(self._neurons)

    @property
    def neurons(self) -> tuple[Neuron, ...]:
        """The neurons, in order (replace one with ``set_neuron``)."""
        return tuple(self._neurons)

    @property
    def nbytes(self) -> int:
        """Total size of the layer's filters in bytes."""
        return sum(n.nbytes for n in self._neurons)

    def set_neuron(self, index: int, neuron: Neuron) -> None:
        """Replace neuron ``index``."""
        if not 0 <= index < self.width:
            raise IndexError(f"neuron {index} is outside this layer of width {self.width}")
        self._neurons[index] = neuron
        self._stack = None

    def inputs(self, features: NDArray[np.uint32]) -> NDArray[np.uint32]:
        """Each neuron's input value ``[N, width]`` from the layer's features ``[N, F]``."""
        cols = np.arange(self.width) % features.shape[1]
        x = features[:, cols]
        if self.premodulo:
            x = hash32(x, np.arange(self.width, dtype=U32), self.premodulo)
        return x

    def neuron_inputs(self, features: NDArray[np.uint32], index: int) -> NDArray[np.uint32]:
        """Neuron ``index``'s input values ``[N]``: column ``index`` of ``inputs``, alone."""
        x = features[:, index % features.shape[1]]
        if self.premodulo:
            x = hash32(x, U32(index), self.premodulo)
        return x

    def bits(self, inputs: NDArray[np.uint32]) -> NDArray[np.bool_]:
        """Each neuron's output bit ``[N, width]`` for its input values ``[N, width]``."""
        stack = self._stacked()
        keys = inputs
        for cols, salts, mods in stack.programs:  # one group per program length
            whole = cols.size == self.width
            part = keys if whole else keys[:, cols]
            for salt, mod in zip(salts, mods, strict=True):  # one salt/modulo per column
                part = hash32(part, salt, mod)
            if whole:
                keys = part
            else:
                if keys is inputs:
                    keys = inputs.copy()  # never write into the caller's array
                keys[:, cols] = part
        return probe(stack.tables, stack.offsets, stack.cells, keys)

    def forward(self, features: NDArray[np.uint32]) -> NDArray[np.bool_]:
        """Output bits ``[N, width]`` from the layer's features ``[N, F]``."""
        return self.bits(self.inputs(features))

    def _stacked(self) -> _Stack:
        if self._stack is None:
            by_length: dict[int, list[int]] = {}
            for i, neuron in enumerate(self._neurons):
                by_length.setdefault(len(neuron.program), []).append(i)
            programs = []
            for length, cols in sorted(by_length.items()):
                if length == 0:
                    continue
                pairs = np.array([self._neurons[i].program for i in cols], dtype=np.int64)
                programs.append((np.array(cols, dtype=np.intp),
                                 pairs[:, :, 0].T.astype(U32), pairs[:, :, 1].T.astype(U32)))
            sizes = np.array([n.filter.nbytes for n in self._neurons], dtype=np.int64)
            tables = (np.concatenate([n.filter.data for n in self._neurons])
                      if sizes.sum() else np.zeros(0, dtype=np.uint8))
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            self._stack = _Stack(tuple(programs), tables, offsets, sizes * CELLS_PER_BYTE)
        return self._stack
