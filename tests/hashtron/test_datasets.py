"""Generated datasets: the reference's isalnum and squareroot tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.errors import DataError
from kiln.hashtron import isalnum, squareroot
from kiln.hashtron.datasets import floor_sqrt


def test_isalnum() -> None:
    ds = isalnum()
    assert ds.features.shape == (256, 1) and ds.features.dtype == np.uint32
    assert ds.labels.dtype == np.uint64 and ds.label_bits == 1 and len(ds) == 256
    expect = [int(chr(c).isascii() and chr(c).isalnum()) for c in range(256)]
    assert ds.labels.tolist() == expect and sum(expect) == 62


@pytest.mark.parametrize(("size", "n", "bits"), [("small", 256, 4), ("medium", 1024, 5),
                                                 ("big", 4096, 6), ("huge", 16384, 7),
                                                 (1000, 1000, 5), (1, 1, 1)])
def test_squareroot(size, n: int, bits: int) -> None:
    ds = squareroot(size)
    assert ds.features.shape == (n, 1) and ds.label_bits == bits
    assert ds.features[:, 0].tolist() == list(range(n))
    assert ds.labels.tolist() == [math.isqrt(i) for i in range(n)]


def test_floor_sqrt_is_exact_near_large_squares() -> None:
    roots = np.array([2**16 - 1, 2**16, 94906265, 2**26 - 1], dtype=np.uint64)
    values = np.concatenate([roots**2 - 1, roots**2, roots**2 + 1])
    assert floor_sqrt(values).tolist() == [math.isqrt(int(v)) for v in values]


def test_squareroot_errors() -> None:
    with pytest.raises(DataError, match="unknown"):
        squareroot("giant")
    with pytest.raises(DataError, match="n <= 2"):
        squareroot(0)
