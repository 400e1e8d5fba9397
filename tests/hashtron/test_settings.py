"""Hashtron settings: defaults, validation with key paths, round trips, templates."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kiln.errors import ConfigError
from kiln.hashtron.settings import (
    TEMPLATES,
    HashtronSettings,
    PipelineSettings,
    settings_table,
    template,
)


def test_defaults_match_the_spec() -> None:
    s = HashtronSettings()
    assert s.pipeline.direction == "backward" and s.pipeline.max_attempts == 3
    assert s.capacity.max_change_factor == 10.0 and s.capacity.min_capacity == 1.0
    assert s.capacity.max_capacity_fraction == 1.0  # capacity in [1, N]
    assert s.gold_zone.noise_scale == 1.0 and s.gold_zone.collapse_fraction == 0.8
    assert s.alerts.train_accuracy == 0.95 and s.alerts.stagnation_epochs == 3


def test_dict_round_trip_is_json_and_exact() -> None:
    s = HashtronSettings.from_dict({
        "pipeline": {"direction": "forward", "epochs": 2},
        "capacity": {"damping": "exponential", "smoothing": 0.25},
        "task": {"name": "squareroot", "options": {"n": 256}},
        "layers": [{"width": 4, "combiner": {"kind": "sum", "dims": [4]}}, {"width": 1}],
    })
    text = json.dumps(s.to_dict())
    assert HashtronSettings.from_dict(json.loads(text)) == s
    assert s.pipeline.epochs == 2 and s.capacity.smoothing == 0.25
    assert HashtronSettings.from_dict(None) == HashtronSettings()


@pytest.mark.parametrize(("data", "match"), [
    ({"pipline": {}}, r"hashtron: unknown key\(s\) \['pipline'\]"),
    ({"pipeline": {"directon": "x"}}, r"hashtron.pipeline: unknown key\(s\) \['directon'\]"),
    ({"pipeline": {"direction": "sideways"}}, r"hashtron.pipeline.direction: got 'sideways'"),
    ({"pipeline": {"epochs": 0}}, r"hashtron.pipeline.epochs: got 0, expected a value >= 1"),
    ({"pipeline": {"epochs": 1.5}}, r"hashtron.pipeline.epochs: got 1.5, expected an integer"),
    ({"capacity": {"max_change_factor": 0.5}}, r"hashtron.capacity.max_change_factor"),
    ({"capacity": {"damping": "heavy"}}, r"hashtron.capacity.damping"),
    ({"gold_zone": {"collapse_fraction": 1.5}}, r"hashtron.gold_zone.collapse_fraction"),
    ({"gold_zone": {"moderate_high_fraction": 0.5}}, r"moderate_high_fraction"),
    ({"cache": {"keep_last": 0}}, r"hashtron.cache.keep_last"),
    ({"alerts": {"train_accuracy": True}}, r"hashtron.alerts.train_accuracy"),
    ({"task": {"eval_fraction": 0.95}}, r"hashtron.task.eval_fraction"),
    ({"layers": []}, r"hashtron.layers"),
    ({"pipeline": "fast"}, r"hashtron.pipeline: got 'fast', expected a mapping"),
])
def test_bad_values_name_the_key_path(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HashtronSettings.from_dict(data)


@pytest.mark.parametrize(("data", "match"), [
    ({"capacity": {"damping": "moving_average", "window": 6}, "cache": {"keep_last": 4}},
     r"hashtron.capacity.window: got 6, .*keep_last = 4.* at most 5"),
    ({"alerts": {"oscillation_window": 5}, "cache": {"keep_last": 4}},
     r"hashtron.alerts.oscillation_window: got 5, .*keep_last = 4.*could never fire"),
    ({"cache": {"keep_last": 2}},
     r"hashtron.alerts.oscillation_window: got 4, .*raise cache.keep_last to at least 4"),
])
def test_windows_longer_than_the_cache_history_are_refused(data: dict, match: str) -> None:
    # the cache answers at most keep_last records per neuron: a longer window would silently
    # shrink (moving average) or never fill (oscillation alert)
    with pytest.raises(ConfigError, match=match):
        HashtronSettings.from_dict(data)
    # a window that the history holds is fine, and window only matters for moving_average
    HashtronSettings.from_dict({"capacity": {"damping": "moving_average", "window": 5},
                                "cache": {"keep_last": 4}})
    HashtronSettings.from_dict({"capacity": {"window": 50}, "cache": {"keep_last": 4}})


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"hashtron\.pipeline\.vote"):
        HashtronSettings(pipeline=PipelineSettings(vote="loud"))


def test_table_documents_every_field() -> None:
    rows = settings_table()
    keys = [k for k, _, _ in rows]
    expected = ["hashtron.layers"] + [
        f"hashtron.{section}.{f.name}"
        for section in ("task", "pipeline", "capacity", "gold_zone", "cache", "alerts")
        for f in dataclasses.fields(type(getattr(HashtronSettings(), section)))]
    assert sorted(keys) == sorted(expected)
    assert all(doc and doc.strip() == doc for _, _, doc in rows)
    assert ("hashtron.capacity.max_change_factor", 10.0) in [(k, d) for k, d, _ in rows]


def test_templates() -> None:
    assert set(TEMPLATES) >= {"backward", "forward", "gentle", "aggressive"}
    assert template("forward").pipeline.direction == "forward"
    assert template("gentle").capacity.damping == "moving_average"
    with pytest.raises(ConfigError, match="unknown"):
        template("turbo")


def test_replace_merges_section_fields() -> None:
    s = HashtronSettings().replace(pipeline={"epochs": 7}, cache={"keep_last": 4})
    assert s.pipeline.epochs == 7 and s.pipeline.direction == "backward"
    assert s.cache.keep_last == 4
