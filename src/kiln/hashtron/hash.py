"""The hashtron hash: a salted xorshift mix reduced into ``[0, modulo)``, vectorised with numpy.

Bit-exact with the reference (neurlang/classifier ``hash.Hash``). All values are uint32 and all
arithmetic wraps at 32 bits:

    m = n - s
    m ^= m << 2;  m ^= m << 3;  m ^= m >> 5;  m ^= m >> 7
    m ^= m << 11; m ^= m << 13; m ^= m >> 17; m ^= m << 19
    m += s
    return (uint64(m) * modulo) >> 32        # Lemire's multiply-shift reduction

numpy's unsigned array arithmetic wraps exactly like Go's, so the formula carries over; the
work is done in place on one scratch buffer because the mix is memory-bound.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

U32 = np.uint32
MASK32 = 0xFFFFFFFF

# (direction, amount) of the eight xorshift steps, in order: "<" is a left shift.
_XORSHIFTS = (("<", 2), ("<", 3), (">", 5), (">", 7), ("<", 11), ("<", 13), (">", 17), ("<", 19))


def as_u32(values: ArrayLike) -> NDArray[np.uint32]:
    """``values`` as a uint32 array, wrapping integers modulo 2**32 like Go's ``uint32()``."""
    arr = np.asarray(values)
    if arr.dtype == U32:
        return arr
    if arr.dtype.kind in "iub" or arr.size == 0:
        return arr.astype(U32)  # integer casts truncate, i.e. wrap modulo 2**32
    if arr.dtype == object:  # Python ints too wide for int64
        return np.array([int(v) & MASK32 for v in arr.ravel()], dtype=U32).reshape(arr.shape)
    raise TypeError(f"expected integers, got an array of dtype {arr.dtype}")


def mix(n: ArrayLike, s: ArrayLike) -> NDArray[np.uint32]:
    """The hash before the modular reduction: the full 32-bit mixed value (broadcasts n, s)."""
    n32, s32 = np.broadcast_arrays(as_u32(n), as_u32(s))
    m = np.array(n32, dtype=U32, copy=True)  # own buffer: everything below runs in place
    np.subtract(m, s32, out=m)
    tmp = np.empty_like(m)
    for direction, amount in _XORSHIFTS:
        shift = np.left_shift if direction == "<" else np.right_shift
        shift(m, U32(amount), out=tmp)
        np.bitwise_xor(m, tmp, out=m)
    np.add(m, s32, out=m)
    return m


def reduce(m: NDArray[np.uint32], modulo: ArrayLike) -> NDArray[np.uint32]:
    """Map mixed values into ``[0, modulo)`` by ``(m * modulo) >> 32``; modulo 0 gives 0."""
    wide = np.multiply(m, as_u32(modulo), dtype=np.uint64)
    wide >>= np.uint64(32)
    return wide.astype(U32)


def hash32(n: ArrayLike, s: ArrayLike, modulo: ArrayLike) -> NDArray[np.uint32]:
    """Hash ``n`` with salt ``s`` into ``[0, modulo)``; arrays broadcast against each other.

    Returns a uint32 array of the broadcast shape (0-d for three scalars). ``modulo`` 0 maps
    everything to 0, as in the reference.
    """
    return reduce(mix(n, s), modulo)


def rotr1(x: NDArray[np.uint32]) -> NDArray[np.uint32]:
    """Rotate uint32 values right by one bit."""
    return (x >> U32(1)) | (x << U32(31))
