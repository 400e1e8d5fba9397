"""The sum cache: records, queries, pruning, snapshots and memory."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import CheckpointError
from kiln.hashtron.settings import CacheSettings, GoldZoneSettings
from kiln.hashtron.sum_cache import (
    COLUMNS,
    DETERMINISTIC,
    RECORD_BYTES,
    SumCache,
    measure_memory,
)
from kiln.state_codec import decode_state, encode_state


def _filled(keep_last: int = 32) -> SumCache:
    cache = SumCache(CacheSettings(keep_last=keep_last), run_id="run-a")
    # neuron 0.0: margins 0.1, 0.3, 0.5 (N = 100); 0.1: collapsed; 1.0: gold; 1.1: noisy
    for k, s in enumerate([10, -30, 50]):
        cache.add(layer=0, position=0, s=s, n=100, premodulo=100 + k, accuracy=0.5, epoch=k,
                  step=k)
    cache.add(layer=0, position=1, s=95, n=100, premodulo=1, step=3)
    cache.add(layer=1, position=0, s=-40, n=100, premodulo=6, step=4)
    cache.add(layer=1, position=1, s=3, n=100, premodulo=9000, step=5)
    return cache


def test_records_and_latest() -> None:
    cache = _filled()
    assert len(cache) == 6
    latest = cache.latest(0, 0)
    assert latest is not None
    assert (latest["s"], latest["premodulo"], latest["epoch"]) == (50, 102, 2)
    assert latest["neuron"] == "0.0" and latest["margin"] == 0.5 and latest["run"] == "run-a"
    assert cache.latest(3, 3) is None
    assert [r["s"] for r in cache.records(layer=0)] == [10, -30, 50, 95]
    assert [r["position"] for r in cache.records(layer=1, position=1)] == [1]
    assert set(cache.records()[0]) >= {*COLUMNS, "margin", "neuron"}


def test_history_and_trend() -> None:
    cache = _filled()
    hist = cache.history(0, 0, 2)
    assert hist["s"].tolist() == [-30, 50] and hist["margin"].tolist() == [0.3, 0.5]
    margins, slope = cache.margin_trend(0, 0, 3)
    assert margins.tolist() == pytest.approx([0.1, 0.3, 0.5]) and slope == pytest.approx(0.2)
    assert cache.margin_trend(1, 0)[1] == 0.0  # a single run has no trend


def test_gold_zone_and_distribution() -> None:
    cache = _filled()
    gold = cache.gold_zone(GoldZoneSettings())  # 10 < |S| < 80 for N = 100
    assert gold == [(0, 0, 0.5), (1, 0, 0.4)]
    assert cache.gold_zone(GoldZoneSettings(), layer=1) == [(1, 0, 0.4)]
    assert cache.margin_histogram(0, bins=4).tolist() == [0, 0, 1, 1]  # 0.5 and 0.95
    dist = cache.margin_distribution(3)
    assert dist[1]["neurons"] == 2 and dist[1]["mean"] == pytest.approx((0.4 + 0.03) / 2)
    assert dist[2] == {"layer": 2, "neurons": 0, "mean": None, "min": None, "max": None,
                       "histogram": [0] * 10}


def test_pruning_keeps_the_newest_per_neuron_and_a_global_cap() -> None:
    cache = SumCache(CacheSettings(keep_last=3, max_records=10_000))
    for r in range(20):
        cache.add_many(layer=np.zeros(5, np.int32), position=np.arange(5), s=np.full(5, r),
                       n=100, premodulo=r + 1, step=r)
    cache.prune()
    assert len(cache) == 15
    for p in range(5):
        assert cache.history(0, p)["s"].tolist() == [17, 18, 19]
    capped = SumCache(CacheSettings(keep_last=100, max_records=7))
    for r in range(20):
        capped.add(layer=0, position=r % 2, s=r, n=100, premodulo=1, step=r)
    assert len(capped) <= 7
    assert capped.column("s").tolist() == list(range(20 - len(capped), 20))  # the oldest went


def test_history_never_reaches_past_keep_last() -> None:
    # what the pipeline decides must not depend on when pruning last ran
    cache = SumCache(CacheSettings(keep_last=2))
    for s in range(5):
        cache.add(layer=0, position=0, s=s, n=10, premodulo=1)
    assert len(cache) == 5  # not pruned yet (pruning runs at count thresholds)
    assert cache.history(0, 0)["s"].tolist() == [3, 4]


def test_state_round_trip_through_the_checkpoint_codec() -> None:
    cache = _filled()
    cache.set_run("run-b")
    cache.add(layer=0, position=0, s=7, n=100, premodulo=5)
    tensors, skeleton = encode_state(cache.state_dict())
    restored = SumCache(CacheSettings())
    restored.load_state_dict(decode_state(tensors, skeleton))
    a, b = cache.state_dict(), restored.state_dict()
    assert a["runs"] == b["runs"] == ["run-a", "run-b"] and a["prune_at"] == b["prune_at"]
    for name in COLUMNS:
        assert a["columns"][name].dtype == b["columns"][name].dtype
        assert a["columns"][name].tobytes() == b["columns"][name].tobytes()
    assert restored.latest(0, 0)["run"] == "run-b"
    det = cache.state_dict(deterministic_only=True)
    assert set(det["columns"]) == set(DETERMINISTIC) and "timestamp" not in det["columns"]


@pytest.mark.parametrize("mutate", [
    lambda s: s.update(format="other"),
    lambda s: s.update(version=9),
    lambda s: s["columns"].pop("s"),
    lambda s: s["columns"].update(s=s["columns"]["s"].astype(np.int32)),
    lambda s: s["columns"].update(n=s["columns"]["n"][:-1]),
    lambda s: s.update(runs=[]),
    lambda s: s["columns"].update(run=s["columns"]["run"] + 5),
])
def test_corrupt_state_is_a_checkpoint_error(mutate) -> None:
    state = _filled().state_dict()
    mutate(state)
    with pytest.raises(CheckpointError, match="sum cache"):
        SumCache().load_state_dict(state)


def test_memory_is_compact_at_small_scale() -> None:
    assert RECORD_BYTES == 61
    report = measure_memory(neurons=2000, runs=50, keep_last=8)
    assert report["inserted"] == 100_000 and report["records"] == 2000 * 8
    assert report["used_bytes"] == 16_000 * RECORD_BYTES
    # doubling growth plus the prune margin: at most ~3x the retained records allocated
    assert report["allocated_bytes"] <= 3 * 2000 * 8 * RECORD_BYTES + 64 * RECORD_BYTES
    assert report["peak_traced_bytes"] < 8 * 2**20
