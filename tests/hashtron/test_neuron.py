"""Neurons: forward against the scalar reference, training from key -> bit maps, size per key."""

from __future__ import annotations

import numpy as np
import pytest
from hashtron_scalar import neuron_forward_scalar
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.errors import DataError
from kiln.hashtron.neuron import Neuron, as_program


def test_random_neuron_is_a_one_bit_hash() -> None:
    a = Neuron.random(np.random.default_rng(7))
    b = Neuron.random(np.random.default_rng(7))
    assert a == b and a.bits == 1 and a.filter.nbytes == 0
    ((salt, modulo),) = a.program
    assert modulo == 2 and 0 <= salt < 2**31
    assert Neuron.random(np.random.default_rng(8)) != a


@settings(max_examples=40, deadline=None)
@given(
    program=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
                     max_size=3),
    bits=st.integers(1, 8),
    xs=st.lists(st.integers(0, 2**16 - 1), min_size=1, max_size=20),
    seed=st.integers(0, 1000),
)
def test_forward_matches_scalar(program, bits, xs, seed) -> None:
    rng = np.random.default_rng(seed)
    neuron = Neuron(program, bits)
    # give it a filter trained on random keys so lookups go through the table
    keys = rng.integers(0, 2**32, 50, dtype=np.uint64).astype(np.uint32)
    neuron = neuron.fit(np.unique(keys), rng.integers(0, 2, np.unique(keys).size))
    got = neuron.forward(np.array(xs, dtype=np.uint32))
    table = bytes(neuron.filter.data)
    assert got.tolist() == [neuron_forward_scalar(program, bits, table, x) for x in xs]
    assert neuron.bit(xs).tolist() == [bool(v & 1) for v in got.tolist()]


def test_trained_neuron_reproduces_every_training_key() -> None:
    rng = np.random.default_rng(0)
    n = 10_000
    keys = rng.choice(2**32, n, replace=False).astype(np.uint32)
    wanted = rng.integers(0, 2, n).astype(bool)
    neuron = Neuron(((12345, 2**20),)).fit(keys, wanted)
    assert (neuron.filter.lookup(keys) == wanted).all()
    bytes_per_key = neuron.nbytes / n
    assert 0.3 < bytes_per_key <= 0.41, bytes_per_key  # reference: ~0.375


def test_fit_inputs_through_the_program() -> None:
    rng = np.random.default_rng(1)
    inputs = np.arange(3000, dtype=np.uint32) * 21  # < 2**16: bit j lands in bits 16+
    targets = rng.integers(0, 2**5, inputs.size)
    neuron = Neuron((), bits=5).fit_inputs(inputs, targets)  # empty program: keys = inputs
    assert (neuron.forward(inputs) == targets).all()
    one_bit = Neuron(((99, 2**31),)).fit_inputs(inputs, targets & 1)
    assert (one_bit.bit(inputs) == (targets & 1).astype(bool)).all()


def test_fit_inputs_reports_inputs_the_program_cannot_separate() -> None:
    inputs = np.arange(100, dtype=np.uint32)
    with pytest.raises(DataError, match="want both bit 0 and bit 1"):
        Neuron(((0, 2),)).fit_inputs(inputs, inputs % 3 == 0)


def test_program_validation() -> None:
    assert as_program([[1, 2], (3, 4)]) == ((1, 2), (3, 4))
    with pytest.raises(ValueError, match="outside"):
        Neuron(((2**32, 2),))
    with pytest.raises(ValueError, match="bits"):
        Neuron((), bits=65)
    with pytest.raises(ValueError, match="output bit"):
        Neuron((), bits=2).keys([1], j=2)
