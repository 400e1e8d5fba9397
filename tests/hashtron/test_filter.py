"""The quaternary filter: every key answers its bit, lookups match the reference's, sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hashtron_scalar import filter_build_scalar, filter_lookup_scalar
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kiln.errors import DataError
from kiln.hashtron.filter import QuaternaryFilter, build_filter, probe, unique_key_bits


def _random_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.choice(2**32, size=n, replace=False).astype(np.uint32)
    return keys, rng.integers(0, 2, n).astype(bool)


@settings(max_examples=60, deadline=None)
@given(
    keys=hnp.arrays(np.uint32, st.integers(0, 300), elements=st.integers(0, 2**32 - 1),
                    unique=True),
    seed=st.integers(0, 2**16),
)
def test_built_filter_answers_every_key(keys: np.ndarray, seed: int) -> None:
    wanted = np.random.default_rng(seed).integers(0, 2, keys.size).astype(bool)
    filt = build_filter(keys, wanted)
    assert (filt.lookup(keys) == wanted).all()


@settings(max_examples=40, deadline=None)
@given(table=st.binary(max_size=64), keys=st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_lookup_matches_scalar_lookup_on_any_table(table: bytes, keys: list[int]) -> None:
    # any byte string is a valid table, including ones full of collision cells
    got = QuaternaryFilter(np.frombuffer(table, dtype=np.uint8)).lookup(keys)
    assert got.tolist() == [filter_lookup_scalar(table, k) for k in keys]


def test_reference_built_filters_read_back_in_kiln_and_vice_versa() -> None:
    keys, wanted = _random_task(400, 1)
    ref = filter_build_scalar(keys.tolist(), wanted.tolist())
    assert (QuaternaryFilter(np.frombuffer(ref, dtype=np.uint8)).lookup(keys) == wanted).all()
    ours = bytes(build_filter(keys, wanted).data)
    assert [filter_lookup_scalar(ours, int(k)) for k in keys] == wanted.tolist()


@pytest.mark.parametrize("n", [10, 1000, 20000])
def test_size_per_key_is_like_the_reference(n: int) -> None:
    keys, wanted = _random_task(n, n)
    filt = build_filter(keys, wanted)
    per_key = filt.nbytes / n
    assert per_key <= 0.41  # reference: ~0.375 bytes per key (1.5 cells of 2 bits)
    assert filt.cells == 4 * filt.nbytes
    assert (filt.lookup(keys) == wanted).all()


def test_growth_when_the_table_starts_too_small() -> None:
    keys, wanted = _random_task(500, 3)
    filt = build_filter(keys, wanted, cells_per_key=0.05)
    assert (filt.lookup(keys) == wanted).all()
    assert filt.nbytes > 500 * 0.05 / 4


def test_deterministic_and_order_independent() -> None:
    keys, wanted = _random_task(2000, 4)
    a = build_filter(keys, wanted)
    order = np.random.default_rng(0).permutation(keys.size)
    b = build_filter(keys[order], wanted[order])
    assert a == b and bytes(a.data) == bytes(b.data)


def test_empty_filter_answers_parity() -> None:
    empty = build_filter(np.zeros(0, np.uint32), np.zeros(0, bool))
    assert empty.nbytes == 0
    assert empty.lookup([0, 1, 2, 7]).tolist() == [False, True, False, True]


def test_probe_many_tables_at_once() -> None:
    (k1, w1), (k2, w2) = _random_task(50, 5), _random_task(80, 6)
    f1, f2 = build_filter(k1, w1), build_filter(k2, w2)
    tables = np.concatenate([f1.data, f2.data])
    keys = np.stack([k1[:50], k2[:50]], axis=1)
    got = probe(tables, np.array([0, f1.nbytes]), np.array([f1.cells, f2.cells]), keys)
    assert (got[:, 0] == w1).all() and (got[:, 1] == w2[:50]).all()
    no_table = probe(tables, np.array([0]), np.array([0]), keys[:, :1])
    assert (no_table[:, 0] == (k1 & 1).astype(bool)).all()


def test_duplicates_must_agree() -> None:
    keys, bits = unique_key_bits([5, 3, 5, 3], [1, 0, 1, 0])
    assert keys.tolist() == [3, 5] and bits.tolist() == [False, True]
    with pytest.raises(DataError, match="want both bit 0 and bit 1"):
        build_filter([5, 3, 5], [1, 0, 0])
    with pytest.raises(DataError, match=r"\[0, 2\*\*32\)"):
        build_filter([-1], [1])
    with pytest.raises(DataError, match="equal length"):
        build_filter([1, 2], [1])
    with pytest.raises(DataError, match="integers"):
        build_filter([1.5, 2.0], [1, 0])


def test_filter_data_is_immutable_and_copied() -> None:
    filt = build_filter([1, 2, 3], [0, 0, 1])
    with pytest.raises(ValueError):
        filt.data[0] = 1
    mine = np.array([3, 0, 0], dtype=np.uint8)
    copied = QuaternaryFilter(mine)
    mine[0] = 0  # the caller's array stays writable and changing it changes nothing
    assert copied.data.tolist() == [3, 0, 0]
