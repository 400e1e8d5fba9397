"""The capacity law, its clamps and damping, regimes, the forward schedule and the R^2."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hashtron_nets import capacity_law
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.hashtron.capacity import (
    MAX_PREMODULO,
    decide_premodulo,
    premodulo_margin_r2,
    reference_premodulo,
    regime,
)
from kiln.hashtron.settings import CapacitySettings, GoldZoneSettings

law = capacity_law


@pytest.mark.parametrize(("s", "n", "previous", "expect"), [
    (99, 1000, None, 100),  # capacity 10
    (-99, 1000, None, 100),  # the sign does not matter
    (0, 100, None, 10_000),  # noisy: capacity N
    (100, 100, None, 1),  # collapsed: capacity N/(N+1) < 1 -> 1
    (99, 1000, 10_000, 1000),  # 10x clamp downwards
    (99, 1000, 5, 50),  # 10x clamp upwards
    (99, 1000, 3, 30),
    (0, 100_000, None, MAX_PREMODULO),  # N^2 does not fit a uint32 modulo
    (0, 1, None, 1),  # N = 1
])
def test_law_and_clamp(s: int, n: int, previous: int | None, expect: int) -> None:
    d = decide_premodulo(s, n, previous=previous)
    assert d.premodulo == expect == law(s, n, previous)
    assert d.clamped == (d.premodulo != d.target_premodulo)
    assert d.target_capacity == pytest.approx(n / (abs(s) + 1))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 200_000), data=st.data())
def test_law_matches_an_independent_formula(n: int, data) -> None:
    s = data.draw(st.integers(-n, n))
    previous = data.draw(st.one_of(st.none(), st.integers(1, MAX_PREMODULO)))
    factor = data.draw(st.sampled_from([0.0, 1.0, 2.0, 10.0]))
    d = decide_premodulo(s, n, previous=previous,
                         settings=CapacitySettings(max_change_factor=factor))
    assert d.premodulo == law(s, n, previous, factor)
    assert 1 <= d.premodulo <= MAX_PREMODULO
    if previous is not None and factor and d.premodulo not in (1, min(n * n, MAX_PREMODULO)):
        assert previous / factor - 1 < d.premodulo < previous * factor + 1


def test_damping_options() -> None:
    n = 1000
    past = [0.5, 0.1]  # margins of the two previous runs
    avg = CapacitySettings(damping="moving_average", window=3)
    d = decide_premodulo(99, n, previous=None, past_margins=past, settings=avg)
    assert d.sum_used == pytest.approx((500 + 100 + 99) / 3)
    assert d.target_premodulo == math.floor((n / (d.sum_used + 1)) ** 2 + 0.5)
    one = CapacitySettings(damping="moving_average", window=1)
    assert decide_premodulo(99, n, previous=None, past_margins=past, settings=one).sum_used == 99
    exp = CapacitySettings(damping="exponential", smoothing=0.25)
    d = decide_premodulo(99, n, previous=None, past_margins=past, settings=exp)
    assert d.sum_used == pytest.approx(0.25 * 99 + 0.75 * (0.25 * 100 + 0.75 * 500))
    pct = CapacitySettings(damping="max_percent", max_percent=50.0)
    assert decide_premodulo(99, n, previous=1000, settings=pct).premodulo == 500
    assert decide_premodulo(0, n, previous=1000, settings=pct).premodulo == 1500
    assert decide_premodulo(0, n, previous=1, settings=pct).premodulo == 2  # 1 can still grow
    none = CapacitySettings(damping="none")
    assert decide_premodulo(99, n, previous=None, past_margins=past, settings=none).sum_used == 99


def test_capacity_bounds_are_settings() -> None:
    cfg = CapacitySettings(min_capacity=3.0, max_capacity_fraction=0.5)
    assert decide_premodulo(1000, 1000, previous=None, settings=cfg).premodulo == 9
    assert decide_premodulo(0, 1000, previous=None, settings=cfg).premodulo == 250_000


def test_regimes() -> None:
    gold = GoldZoneSettings()  # eps = sqrt(N) = 10, tau = 0.8 N = 80 for N = 100
    assert [regime(s, 100, gold) for s in (0, 10, 11, -50, 79, 80, 100)] == [
        "noisy", "noisy", "gold", "gold", "gold", "collapsed", "collapsed"]
    assert decide_premodulo(50, 100, previous=None).regime == "gold"


def test_reference_schedule() -> None:
    assert reference_premodulo(1.0, 100, 1.0, 16.0) == 1600
    assert reference_premodulo(0.5, 100, 1.0, 16.0) == 100
    assert reference_premodulo(0.75, 100, 1.0, 16.0) == math.floor(625 * -1500 / 2500 + 1600)
    assert reference_premodulo(0.0, 100, 1.0, 16.0) == 2  # floored at 2


def test_r2() -> None:
    n = np.full(50, 1000)
    s = np.linspace(0, 1000, 50)
    p = np.floor((1000 / (s + 1)) ** 2 + 0.5)
    assert premodulo_margin_r2(s / n, p, n) > 0.99
    rng = np.random.default_rng(0)
    assert premodulo_margin_r2(s / n, rng.integers(1, 10**6, 50), n) < 0.2
    assert math.isnan(premodulo_margin_r2(s[:2] / 1000, p[:2], n[:2]))
    assert math.isnan(premodulo_margin_r2(np.ones(5), np.ones(5), np.ones(5)))
