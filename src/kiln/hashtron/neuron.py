"""One neuron (a "hashtron"): a hash program, an output bit count and a learned filter.

For an input value ``x`` (uint32) and output bit ``j``::

    v = x | (j << 16)
    for salt, modulo in program: v = hash32(v, salt, modulo)
    bit j = filter.lookup(v)          # an empty filter answers v & 1

The value reaching the filter is the neuron's *key*. Training a neuron means building a filter
from a key -> bit map (``Neuron.fit``); the program decides which inputs share a key, i.e. the
neuron's capacity. A fresh neuron has the program ``[(random salt, 2)]`` and no filter: a random
one-bit function, as in the reference. An empty program passes ``x | (j << 16)`` straight on.

Programs apply their entries one after another, each with the modulo written in it, as the
reference notes describe. (Older reference versions, whose salt solver built multi-entry
programs, derived the later moduli differently; trained neurons today have a single entry.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kiln.errors import DataError
from kiln.hashtron.filter import QuaternaryFilter, build_filter
from kiln.hashtron.hash import MASK32, U32, as_u32, hash32

MAX_BITS = 64  # outputs are packed into a uint64
Program = tuple[tuple[int, int], ...]


def as_program(pairs: Iterable[Iterable[int]]) -> Program:
    """Validate ``(salt, modulo)`` pairs (each in [0, 2**32)) into a tuple of int pairs."""
    program = []
    for pair in pairs:
        salt, modulo = (int(v) for v in pair)
        if not (0 <= salt <= MASK32 and 0 <= modulo <= MASK32):
            raise ValueError(f"program entry ({salt}, {modulo}) is outside [0, 2**32)")
        program.append((salt, modulo))
    return tuple(program)


def run_program(program: Program, values: ArrayLike) -> NDArray[np.uint32]:
    """Apply a program's hashes, in order, to uint32 values."""
    v = as_u32(values)
    for salt, modulo in program:
        v = hash32(v, salt, modulo)
    return v


@dataclass(frozen=True)
class Neuron:
    """A hashtron: ``program`` of (salt, modulo) pairs, ``bits`` outputs and a ``filter``."""

    program: Program
    bits: int = 1
    filter: QuaternaryFilter = field(default_factory=QuaternaryFilter.empty)

    def __post_init__(self) -> None:
        object.__setattr__(self, "program", as_program(self.program))
        if not 1 <= int(self.bits) <= MAX_BITS:
            raise ValueError(f"bits must be in [1, {MAX_BITS}], got {self.bits}")
        object.__setattr__(self, "bits", int(self.bits))

    @classmethod
    def random(cls, rng: np.random.Generator, bits: int = 1) -> Neuron:
        """A fresh neuron: program ``[(random >> 1, 2)]``, no filter."""
        salt = int(rng.integers(0, 1 << 32, dtype=np.uint64)) >> 1
        return cls(((salt, 2),), bits)

    @property
    def nbytes(self) -> int:
        """Size of the learned filter in bytes."""
        return self.filter.nbytes

    def keys(self, x: ArrayLike, j: int = 0) -> NDArray[np.uint32]:
        """The filter keys of inputs ``x`` for output bit ``j``."""
        if not 0 <= j < self.bits:
            raise ValueError(f"output bit {j} is outside [0, {self.bits})")
        return run_program(self.program, as_u32(x) | U32(j << 16))

    def bit(self, x: ArrayLike) -> NDArray[np.bool_]:
        """Output bit 0 for each input (what a network layer reads)."""
        return self.filter.lookup(self.keys(x, 0))

    def forward(self, x: ArrayLike) -> NDArray[np.uint64]:
        """All ``bits`` output bits of each input, bit ``j`` at position ``j``."""
        x = as_u32(x)
        out = np.zeros(x.shape, dtype=np.uint64)
        for j in range(self.bits):
            out |= self.filter.lookup(self.keys(x, j)).astype(np.uint64) << np.uint64(j)
        return out

    def with_program(self, program: Iterable[Iterable[int]]) -> Neuron:
        """This neuron with another program and no filter (the old one keyed other values)."""
        return Neuron(as_program(program), self.bits)

    def fit(self, keys: ArrayLike, wanted: ArrayLike, **filter_options: float) -> Neuron:
        """A copy whose filter answers ``wanted[k]`` for key ``keys[k]`` (keys: program outputs).

        ``filter_options`` go to ``build_filter`` (cells_per_key, growth, write_budget).
        """
        return replace(self, filter=build_filter(keys, wanted, **filter_options))

    def fit_inputs(
        self, inputs: ArrayLike, targets: ArrayLike, **filter_options: float
    ) -> Neuron:
        """A copy trained so that ``forward(inputs[k]) == targets[k]`` (all ``bits`` bits).

        Raises ``DataError`` if two inputs share a key but want different bits: the program
        cannot tell them apart (give it a larger modulo).
        """
        inputs = as_u32(inputs).ravel()
        targets = np.asarray(targets).astype(np.uint64).ravel()
        if targets.shape != inputs.shape:
            raise DataError(
                f"fit_inputs: {inputs.size} inputs but {targets.size} targets; pass one target "
                "per input"
            )
        keys = np.concatenate([self.keys(inputs, j) for j in range(self.bits)])
        wanted = np.concatenate(
            [(targets >> np.uint64(j)) & np.uint64(1) for j in range(self.bits)]
        ).astype(bool)
        return self.fit(keys, wanted, **filter_options)
