"""Combiners: vectorised features against the scalar formulas, shape checks, dict round trip."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from hashtron_scalar import combine_scalar

from kiln.errors import ConfigError
from kiln.hashtron.combiners import Full, MajPool2D, Sum, combiner_from_dict, combiner_to_dict

CASES = [
    (MajPool2D(5, 3, 3, 1, 4, 2), 45, 20),
    (MajPool2D(4, 2, 2, 2, 3, 1, repeat=2, bias=-1), 64, 19),
    (MajPool2D(13, 1, 3, 1, 13, 1), 39, 5),
    (Full(step=3, maxbits=5), 40, 12),
    (Full(step=1, maxbits=32), 40, 9),
    (Sum((24,)), 24, 3),
    (Sum((4, 6), axis=1), 24, 7),
    (Sum((3, 4, 2), axis=1), 24, 5),
]


@pytest.mark.parametrize(("combiner", "width", "features"), CASES)
def test_matches_scalar(combiner, width: int, features: int) -> None:
    combiner.check(width, features)
    bits = np.random.default_rng(width + features).integers(0, 2, (30, width)).astype(bool)
    got = combiner.apply(bits, features)
    assert got.shape == (30, features) and got.dtype == np.uint32
    expect = [combine_scalar(combiner, row.astype(int).tolist(), features) for row in bits]
    assert got.tolist() == expect


def test_sum_of_everything_counts_true_bits() -> None:
    bits = np.zeros((2, 24), dtype=bool)
    bits[0, :5] = True
    bits[1] = True
    assert Sum((24,)).apply(bits, 2).tolist() == [[5, 5], [24, 24]]


def test_majpool_votes_use_the_bias() -> None:
    bits = np.array([[1, 1, 0]], dtype=bool)  # ones - zeros = 1
    assert MajPool2D(1, 1, 3, 1, 1, 1, bias=0).apply(bits, 1).tolist() == [[1]]
    assert MajPool2D(1, 1, 3, 1, 1, 1, bias=1).apply(bits, 1).tolist() == [[0]]


def test_shape_errors_say_what_to_change() -> None:
    with pytest.raises(ConfigError, match="needs repeat"):
        MajPool2D(5, 3, 3, 1, 4, 2).check(44, 3)
    with pytest.raises(ConfigError, match="need 14 input neurons"):
        Full(step=3, maxbits=5).check(13, 4)
    with pytest.raises(ConfigError, match="product"):
        Sum((4, 6)).check(25, 1)
    with pytest.raises(ConfigError, match="32"):
        MajPool2D(8, 8, 1, 1, 8, 8)
    with pytest.raises(ConfigError, match="axis"):
        Sum((4,), axis=1)
    with pytest.raises(ConfigError, match=">= 1"):
        Full(step=0, maxbits=3)


@pytest.mark.parametrize("combiner", [c for c, _, _ in CASES])
def test_dict_round_trip(combiner) -> None:
    spec = combiner_to_dict(combiner)
    assert spec["kind"] == combiner.kind
    assert combiner_from_dict(spec) == combiner


def test_from_dict_errors() -> None:
    with pytest.raises(ConfigError, match="unknown combiner 'conv'"):
        combiner_from_dict({"kind": "conv"}, "layers[0].combiner")
    with pytest.raises(ConfigError, match="bad fields for full: missing"):
        combiner_from_dict({"kind": "full", "step": 1})
    with pytest.raises(ConfigError, match=r"bad fields for sum: unknown key\(s\) \['where'\]"):
        combiner_from_dict({"kind": "sum", "dims": [4], "where": "x"})
    with pytest.raises(ConfigError, match="'kind'"):
        combiner_from_dict([1, 2])


AT = "hashtron.layers[0].combiner"
POOL = {"kind": "majpool2d", "width": 2, "height": 2, "subwidth": 1, "subheight": 1,
        "capwidth": 2, "capheight": 2}


@pytest.mark.parametrize(("spec", "message"), [
    ({"kind": "full", "step": "4", "maxbits": 4}, ".step: got '4', expected an integer"),
    ({"kind": "full", "step": 2.5, "maxbits": 4}, ".step: got 2.5, expected an integer"),
    ({"kind": "full", "step": 4.5, "maxbits": 4}, ".step: got 4.5, expected an integer"),
    ({"kind": "full", "step": 2, "maxbits": 4.0}, ".maxbits: got 4.0, expected an integer"),
    ({"kind": "full", "step": True, "maxbits": 4}, ".step: got True, expected an integer"),
    ({"kind": "full", "step": 0, "maxbits": 4}, ".step: got 0, expected a value >= 1"),
    ({"kind": "full", "step": 1, "maxbits": 33}, ".maxbits: got 33, expected a value <= 32"),
    ({"kind": "sum", "dims": "ab"}, ".dims: got 'ab', expected a non-empty list of integers"),
    ({"kind": "sum", "dims": []}, ".dims: got [], expected a non-empty list of integers"),
    ({"kind": "sum", "dims": [16.5]}, ".dims[0]: got 16.5, expected an integer"),
    ({"kind": "sum", "dims": [4, 4], "axis": 1.0}, ".axis: got 1.0, expected an integer"),
    ({"kind": "sum", "dims": [4, 4], "axis": 2}, ".axis: got 2, expected a value <= 1"),
    ({**POOL, "repeat": "2"}, ".repeat: got '2', expected an integer"),
    ({**POOL, "bias": 0.5}, ".bias: got 0.5, expected an integer"),
    ({**POOL, "capwidth": 8, "capheight": 8}, ": capwidth x capheight = 64 bits"),
])
def test_from_dict_checks_field_types_at_the_key_path(spec: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(AT + message)):
        combiner_from_dict(spec, AT)


def test_direct_construction_names_the_kind() -> None:
    with pytest.raises(ConfigError, match=re.escape("full.step: got 2.5, expected an integer")):
        Full(step=2.5, maxbits=4)
    with pytest.raises(ConfigError, match=re.escape("sum.dims[0]: got True")):
        Sum((True,))
