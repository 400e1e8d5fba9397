"""Small generated datasets of the reference's example tasks, as numpy arrays.

Each is a ``HashtronDataset``: ``features`` uint32 ``[N, 1]`` (one integer feature per sample;
every neuron of a first layer reads it), ``labels`` uint64 ``[N]`` and ``label_bits``, the
output neurons needed to represent every label.

- ``isalnum()``: the 256 byte values 0..255; label 1 where the byte is an ASCII letter or digit
  (``0-9``, ``A-Z``, ``a-z``), as the reference computes it; Latin-1 letters such as 0xE9 are 0
  (unlike Python's ``str.isalnum``).
- ``squareroot(n)``: the integers 0..n-1 with label ``floor(sqrt(i))``. The reference's sizes
  are 256, 1024, 4096 and 16384 (4, 5, 6 and 7 label bits); any ``n >= 1`` works. The
  reference also XORs labels with a constant "parity" (4) during training; Kiln's labels are
  the plain square roots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from kiln.errors import DataError

SQUAREROOT_SIZES = {"small": 256, "medium": 1024, "big": 4096, "huge": 16384}


@dataclass(frozen=True, eq=False)
class HashtronDataset:
    """Integer features ``[N, F]`` (uint32), labels ``[N]`` (uint64) and the label width."""

    name: str
    features: NDArray[np.uint32]
    labels: NDArray[np.uint64]
    label_bits: int

    def __len__(self) -> int:
        return int(self.labels.size)


def _label_bits(labels: NDArray[np.uint64]) -> int:
    return max(1, int(labels.max()).bit_length()) if labels.size else 1


def floor_sqrt(values: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """Exact ``floor(sqrt(v))`` of integers below 2**52, elementwise."""
    root = np.floor(np.sqrt(values.astype(np.float64))).astype(np.uint64)
    # float sqrt can be off by one near perfect squares: correct it exactly in integers
    root -= (root * root > values).astype(np.uint64)
    root += ((root + 1) * (root + 1) <= values).astype(np.uint64)
    return root


def isalnum() -> HashtronDataset:
    """The 256 byte values, labelled 1 for ASCII letters and digits."""
    codes = np.arange(256, dtype=np.uint32)
    alnum = (
        ((codes >= ord("0")) & (codes <= ord("9")))
        | ((codes >= ord("A")) & (codes <= ord("Z")))
        | ((codes >= ord("a")) & (codes <= ord("z")))
    )
    return HashtronDataset("isalnum", codes[:, None], alnum.astype(np.uint64), 1)


def squareroot(n: int | str = "medium") -> HashtronDataset:
    """Integers ``0..n-1`` labelled ``floor(sqrt(i))``; ``n`` may name a reference size."""
    if isinstance(n, str):
        if n not in SQUAREROOT_SIZES:
            raise DataError(f"squareroot size {n!r} is unknown; use an integer or one of "
                            f"{sorted(SQUAREROOT_SIZES)}")
        n = SQUAREROOT_SIZES[n]
    if not 1 <= int(n) <= 1 << 32:
        raise DataError(f"squareroot needs 1 <= n <= 2**32 samples, got {n}")
    values = np.arange(int(n), dtype=np.uint64)
    root = floor_sqrt(values)
    return HashtronDataset(f"squareroot{int(n)}", values.astype(np.uint32)[:, None], root,
                           _label_bits(root))
