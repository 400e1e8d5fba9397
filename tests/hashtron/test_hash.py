"""The hash: the reference test vector, and the vectorised hash against the scalar one."""

from __future__ import annotations

import numpy as np
from hashtron_scalar import hash_scalar, neuron_forward_scalar
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kiln.hashtron.hash import as_u32, hash32, mix, rotr1
from kiln.hashtron.neuron import Neuron

U32S = st.integers(0, 2**32 - 1)


def test_reference_vector() -> None:
    # neurlang/classifier: input 42, program [(0, 2)], 64 bits -> 14106184687260844995
    neuron = Neuron(((0, 2),), bits=64)
    assert int(neuron.forward(42)) == 14106184687260844995
    assert neuron_forward_scalar([(0, 2)], 64, b"", 42) == 14106184687260844995


def test_known_values() -> None:
    assert int(hash32(0, 0, 2**32 - 1)) == 0
    assert int(hash32(1, 5, 0xFFFFFFFF)) == hash_scalar(1, 5, 0xFFFFFFFF) == 273592300
    assert int(hash32(123, 7, 0)) == 0  # modulo 0 maps to 0, as in the reference


@settings(max_examples=200, deadline=None)
@given(n=U32S, s=U32S, modulo=U32S)
def test_scalar_inputs_match_scalar_hash(n: int, s: int, modulo: int) -> None:
    out = hash32(n, s, modulo)
    assert out.dtype == np.uint32 and out.shape == ()
    assert int(out) == hash_scalar(n, s, modulo)
    assert int(out) < max(modulo, 1)


@settings(max_examples=60, deadline=None)
@given(
    n=hnp.arrays(np.uint32, hnp.array_shapes(max_dims=2, max_side=16)),
    s=U32S,
    modulo=hnp.arrays(np.uint32, 1),
)
def test_arrays_match_scalar_hash(n: np.ndarray, s: int, modulo: np.ndarray) -> None:
    out = hash32(n, s, modulo[0])
    assert out.shape == n.shape and out.dtype == np.uint32
    expect = [hash_scalar(int(v), s, int(modulo[0])) for v in n.ravel()]
    assert out.ravel().tolist() == expect


def test_broadcasts_salts_and_moduli_per_column() -> None:
    n = np.arange(12, dtype=np.uint32).reshape(3, 4) * 977
    salts = np.array([0, 1, 2**31, 2**32 - 1], dtype=np.uint32)
    mods = np.array([2, 1000, 2**32 - 1, 7], dtype=np.uint32)
    out = hash32(n, salts, mods)
    for r in range(3):
        for c in range(4):
            assert out[r, c] == hash_scalar(int(n[r, c]), int(salts[c]), int(mods[c]))


def test_inputs_are_not_modified_and_ints_wrap() -> None:
    n = np.array([5, 6], dtype=np.uint32)
    hash32(n, 3, 10)
    assert n.tolist() == [5, 6]
    assert as_u32(-1).item() == 2**32 - 1
    assert as_u32(2**40 + 3).item() == 3
    assert as_u32(2**70 + 9).item() == 9
    assert int(mix(-1, 0)) == int(mix(2**32 - 1, 0))


def test_rotr1() -> None:
    x = np.array([1, 2, 0x80000001], dtype=np.uint32)
    assert rotr1(x).tolist() == [0x80000000, 1, 0xC0000000]
