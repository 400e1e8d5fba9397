"""fsio.json_text: the strict JSON of every file Kiln writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kiln.fsio import json_text


def strict_loads(text: str) -> object:
    """``json.loads`` that rejects NaN, Infinity and -Infinity, as jq and JavaScript do."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_at_any_depth_become_null() -> None:
    value = {
        "loss": math.nan,
        "ppl": math.inf,
        "rows": [1.5, -math.inf, {"grad_norm": np.float64("nan"), "step": 3}],
        "pair": (math.nan, 2),
    }
    assert strict_loads(json_text(value)) == {
        "loss": None,
        "ppl": None,
        "rows": [1.5, None, {"grad_norm": None, "step": 3}],
        "pair": [None, 2],
    }


def test_finite_values_and_options_write_what_json_dumps_writes() -> None:
    value = {"b": [1, 2.5, True, None, "x"], "a": {"z": -0.0, "y": 1e308}, "c": (1, "t")}
    assert json_text(value, indent=2, sort_keys=True) == json.dumps(value, indent=2, sort_keys=True)
    assert json_text(value) == json.dumps(value)


def test_what_cannot_be_made_strict_is_an_error_not_a_bad_file() -> None:
    with pytest.raises(ValueError, match="Out of range float values"):
        json_text({math.nan: 1})
