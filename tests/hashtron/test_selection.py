"""Neuron selection by margin: gold zone first, then moderate, then seeded exploration."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.hashtron.selection import rank_candidates, select_neuron
from kiln.hashtron.settings import GoldZoneSettings
from kiln.hashtron.sum_cache import SumCache

GOLD = GoldZoneSettings()  # N = 400: eps = 20, tau = 320, middle 170; moderate (10, 380]


def _cache(sums: dict[int, int], n: int = 400) -> SumCache:
    cache = SumCache()
    for pos, s in sums.items():
        cache.add(layer=2, position=pos, s=s, n=n, premodulo=4)
    return cache


def test_gold_first_closest_to_the_middle() -> None:
    cache = _cache({0: 0, 1: 30, 2: -160, 3: 300, 4: 350, 5: 15})
    gold, moderate, explore = rank_candidates(cache, 2, range(8), GOLD)
    assert gold == [2, 3, 1] and moderate == [5, 4] and explore == [0, 6, 7]
    sel = select_neuron(cache, 2, range(8), GOLD, np.random.default_rng(0))
    assert (sel.position, sel.tier, sel.margin) == (2, "gold", 0.4)
    # only the candidates count: without 2, the next gold neuron
    assert select_neuron(cache, 2, [0, 1, 3, 5], GOLD, np.random.default_rng(0)).position == 3


def test_latest_record_counts() -> None:
    cache = _cache({1: 170})
    cache.add(layer=2, position=1, s=0, n=400, premodulo=4)  # now noisy
    assert rank_candidates(cache, 2, [0, 1], GOLD)[0] == []


def test_moderate_when_no_gold_then_exploration() -> None:
    cache = _cache({0: 390, 1: 12, 2: 375})
    sel = select_neuron(cache, 2, [0, 1, 2, 3], GOLD, np.random.default_rng(0))
    assert (sel.position, sel.tier) == (1, "moderate")  # 12 is 8 below eps; 375 is 55 above tau
    picks = {select_neuron(cache, 2, [0, 3, 4], GOLD, np.random.default_rng(k)).position
             for k in range(30)}
    assert picks == {0, 3, 4}  # explore: deep collapse and unseen neurons, drawn at random
    a = [select_neuron(cache, 2, [0, 3, 4], GOLD, np.random.default_rng(7)).position
         for _ in range(3)]
    assert len(set(a)) == 1  # seeded: the same generator state gives the same pick


def test_thresholds_come_from_settings() -> None:
    cache = _cache({0: 30, 1: 170})
    wide = GoldZoneSettings(noise_scale=2.0, moderate_low_scale=0.5)  # eps = 40
    assert rank_candidates(cache, 2, [0, 1], wide)[0] == [1]
    assert rank_candidates(cache, 2, [0, 1], GOLD)[0] == [1, 0]


def test_no_candidates() -> None:
    with pytest.raises(ValueError):
        select_neuron(SumCache(), 0, [], GOLD, np.random.default_rng(0))
