"""The quaternary filter: a learned key -> bit table of 2-bit cells, built and read with numpy.

Layout and lookup are those of the reference (neurlang/quaternary ``Filter``), so a table built
here answers every key exactly as the reference's ``GetUint32`` would. ``data`` is the packed
table: cell ``c`` is bits ``2*(c % 4)`` and up of byte ``c // 4``. Looking up a uint32 key ``x``
probes at most ``PROBE_ROUNDS`` cells; round ``i`` reads cell ``hash32(x, i, cells)``:

    0: answer ``x & 1`` (the parity of the probed value: free, arbitrary for unseen keys)
    1: answer False     2: answer True
    3: collision: rotate ``x`` right by one bit and go to the next round

An empty table (no keys) answers the parity of the key, like a neuron without a filter.

Building (``build_filter``) is Kiln's own, vectorised over keys instead of inserting them one by
one: every key sits at its *terminal* cell, the first cell on its probe path that is not 3.
Each sweep looks at the cells where some key gets a wrong answer and decides them with all the
keys that end there: one wanted answer -> that answer (1 or 2); both answers -> 3, and those
keys move on to their next round. Cells only ever go up (0 -> 1|2 -> 3), so the sweeps stop.
As in the reference, a table that needs more than ``write_budget * keys`` cell writes, or a key
that runs out of probe rounds, means the table is too small: it grows by ``growth`` and the
build restarts. With the default 1.5 cells per key a filter costs about 0.375 bytes per key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kiln.errors import DataError
from kiln.hashtron.hash import U32, as_u32, hash32, rotr1

PROBE_ROUNDS = 64  # part of the table format: lookups and builds must agree on it
CELLS_PER_BYTE = 4
_MAX_CELLS = 1 << 32  # cell indices come from a 32-bit hash


@dataclass(frozen=True, eq=False)
class QuaternaryFilter:
    """A packed table of 2-bit cells (``data``: uint8, 4 cells per byte); see the module doc."""

    data: NDArray[np.uint8]

    def __post_init__(self) -> None:
        data = np.array(self.data, dtype=np.uint8, copy=True)  # our own copy, then frozen:
        if data.ndim != 1:  # filters are shared between neurons and layer caches
            raise ValueError(f"filter data must be 1-D, got shape {data.shape}")
        data.setflags(write=False)
        object.__setattr__(self, "data", data)

    @classmethod
    def empty(cls) -> QuaternaryFilter:
        """The filter with no keys: it answers the parity of the key."""
        return cls(np.zeros(0, dtype=np.uint8))

    @property
    def cells(self) -> int:
        """Number of 2-bit cells."""
        return CELLS_PER_BYTE * int(self.data.size)

    @property
    def nbytes(self) -> int:
        """Size of the table in bytes."""
        return int(self.data.size)

    def lookup(self, keys: ArrayLike) -> NDArray[np.bool_]:
        """The stored bit of each uint32 key (parity of the key where it was never stored)."""
        return probe(self.data, 0, self.cells, keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuaternaryFilter) and np.array_equal(self.data, other.data)

    def __hash__(self) -> int:
        return hash(self.data.tobytes())


def probe(
    tables: NDArray[np.uint8], offsets: ArrayLike, cells: ArrayLike, keys: ArrayLike
) -> NDArray[np.bool_]:
    """Look keys up in many packed tables at once.

    ``tables`` holds the tables back to back; key ``keys[k]`` is looked up in the table whose
    first byte is ``offsets[k]`` and that has ``cells[k]`` cells (0: no table, answer parity).
    ``offsets``, ``cells`` and ``keys`` broadcast together; the result has their shape.
    """
    keys = as_u32(keys)
    shape = np.broadcast_shapes(keys.shape, np.shape(offsets), np.shape(cells))
    x = np.broadcast_to(keys, shape).ravel()
    out = (x & U32(1)).astype(bool)
    ncells = np.broadcast_to(np.asarray(cells, dtype=np.int64), shape).ravel()
    if ncells.size and int(ncells.max()) >= _MAX_CELLS:
        raise ValueError("a filter with 2**32 cells or more is not supported")
    active = np.flatnonzero(ncells > 0)
    xa = x[active]
    base = np.broadcast_to(np.asarray(offsets, dtype=np.int64), shape).ravel()[active]
    ca = ncells[active].astype(U32)
    for rnd in range(PROBE_ROUNDS):
        if active.size == 0:
            break
        h = hash32(xa, rnd, ca)
        cell = (tables[base + (h >> U32(2))] >> ((h & U32(3)) << U32(1)).astype(np.uint8)) & 3
        done = cell != 3
        answer = np.where(cell == 0, (xa & U32(1)).astype(bool), cell == 2)
        out[active[done]] = answer[done]
        more = ~done
        active, xa, base, ca = active[more], rotr1(xa[more]), base[more], ca[more]
    out[active] = False  # every round collided: the reference answers false
    return out.reshape(shape)


def unique_key_bits(
    keys: ArrayLike, wanted: ArrayLike, *, where: str = "training data"
) -> tuple[NDArray[np.uint32], NDArray[np.bool_]]:
    """Sorted unique keys and their bits; raises ``DataError`` if a key wants both bits."""
    keys_arr = np.asarray(keys)
    bits = np.asarray(wanted)
    if keys_arr.ndim != 1 or bits.shape != keys_arr.shape:
        raise DataError(
            f"{where}: keys and wanted bits must be 1-D arrays of equal length, got shapes "
            f"{keys_arr.shape} and {bits.shape}"
        )
    if keys_arr.size and keys_arr.dtype.kind not in "iu":
        raise DataError(f"{where}: keys must be integers, got dtype {keys_arr.dtype}")
    if keys_arr.size and (int(keys_arr.min()) < 0 or int(keys_arr.max()) > 0xFFFFFFFF):
        raise DataError(f"{where}: keys must lie in [0, 2**32); pass uint32 keys")
    k32 = keys_arr.astype(U32)
    b = bits.astype(bool)
    if k32.size == 0:
        return k32, b
    order = np.lexsort((b, k32))
    k32, b = k32[order], b[order]
    first = np.ones(k32.size, dtype=bool)
    first[1:] = k32[1:] != k32[:-1]
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], k32.size) - 1
    conflict = b[starts] != b[ends]  # sorted by (key, bit): a key with both bits differs here
    if conflict.any():
        bad = k32[starts[conflict]]
        raise DataError(
            f"{where}: {bad.size} key(s) want both bit 0 and bit 1 (first: {int(bad[0])}); "
            "a filter stores one bit per key: aggregate the votes per key first (a tally does)"
        )
    return k32[starts], b[starts]


def build_filter(
    keys: ArrayLike,
    wanted: ArrayLike,
    *,
    cells_per_key: float = 1.5,
    growth: float = 1.5,
    write_budget: float = 1.0,
) -> QuaternaryFilter:
    """Build a filter that answers ``wanted[k]`` for every ``keys[k]`` (uint32 keys).

    ``cells_per_key``: initial table size per unique key (reference: 1.5, ~0.375 bytes/key).
    ``growth``: factor by which the table and the write budget grow after a failed build.
    ``write_budget``: cell writes allowed per key before a build counts as failed.
    Duplicate keys must agree on their bit (``DataError`` otherwise). Deterministic.
    """
    if cells_per_key <= 0 or growth <= 1 or write_budget <= 0:
        raise ValueError(
            f"need cells_per_key > 0, growth > 1, write_budget > 0; got {cells_per_key}, "
            f"{growth}, {write_budget}"
        )
    ukeys, ubits = unique_key_bits(keys, wanted)
    n = ukeys.size
    if n == 0:
        return QuaternaryFilter.empty()
    cells = _round_cells(cells_per_key * n)
    budget = write_budget * n
    while True:
        table = _settle(ukeys, ubits, cells, budget)
        if table is not None:
            return QuaternaryFilter(_pack(table))
        cells = max(_round_cells(growth * cells), cells + CELLS_PER_BYTE)
        budget *= growth
        if cells >= _MAX_CELLS:
            raise DataError(f"cannot build a filter for {n} keys within 2**32 cells")


def _round_cells(cells: float) -> int:
    """Whole bytes of cells, at least one byte."""
    return CELLS_PER_BYTE * max(1, math.ceil(cells / CELLS_PER_BYTE))


def _settle(
    keys: NDArray[np.uint32], wanted: NDArray[np.bool_], cells: int, budget: float
) -> NDArray[np.uint8] | None:
    """Unpacked cells answering every key, or None if the table is too small (see module)."""
    table = np.zeros(cells, dtype=np.uint8)
    want = wanted.astype(np.uint8)
    x = keys.copy()
    rnd = np.zeros(keys.size, dtype=U32)
    term = hash32(x, rnd, cells)  # each key's terminal cell
    moving = np.arange(keys.size)  # keys whose terminal cell may be a collision (3)
    writes = 0
    while True:
        # Walk keys past collision cells; 3 is final, so a key never walks back.
        while moving.size:
            moving = moving[table[term[moving]] == 3]
            if moving.size == 0:
                break
            rnd[moving] += U32(1)
            if int(rnd[moving].max()) >= PROBE_ROUNDS:
                return None
            x[moving] = rotr1(x[moving])
            term[moving] = hash32(x[moving], rnd[moving], cells)
        value = table[term]
        ok = np.where(value == 0, (x & U32(1)).astype(np.uint8) == want, value == want + 1)
        if ok.all():
            return table
        bad = np.unique(term[~ok])
        writes += bad.size
        if writes > budget:
            return None
        # Every key that ends at a bad cell takes part in deciding its new value.
        on_bad = np.zeros(cells, dtype=bool)
        on_bad[bad] = True
        involved = on_bad[term]
        wants0 = np.zeros(cells, dtype=bool)
        wants1 = np.zeros(cells, dtype=bool)
        wants0[term[involved & (want == 0)]] = True
        wants1[term[involved & (want == 1)]] = True
        single = (table[bad] == 0) & (wants0[bad] != wants1[bad])
        table[bad] = np.where(single, 1 + wants1[bad], 3).astype(np.uint8)
        moving = np.flatnonzero(involved)


def _pack(table: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Four 2-bit cells per byte, the first in the low bits (reference layout)."""
    quads = table.reshape(-1, CELLS_PER_BYTE)
    return (quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)).astype(
        np.uint8
    )
