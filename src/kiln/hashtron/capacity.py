"""The capacity law: how many distinct inputs a neuron may tell apart, from its sum S.

A neuron trained with program ``[(salt, premodulo)]`` maps its inputs into ``premodulo`` keys, so
the premodulo is its capacity for forced collisions. From the neuron's sum ``S`` over ``N``
samples (``tally.Tally.total``) the spec's law gives, in this order:

1. damping: the ``|S|`` fed to the law is this step's (``none``, ``max_percent``), the mean of the
   last ``window`` runs' (``moving_average``) or exponentially smoothed over the neuron's runs
   (``exponential``); past runs enter as margins ``|S|/N`` scaled to today's ``N``;
2. ``target capacity = N / (|S| + 1)``, bounded to ``[min_capacity, max_capacity_fraction * N]``;
3. ``target premodulo = round(capacity^2)``;
4. change clamp against the neuron's previous premodulo (none for its first run): within a
   factor ``max_change_factor`` (default 10x) and, with ``max_percent`` damping, within
   ``max_percent`` % — both rounded outward to whole premodulos so that 1 can still grow;
5. final bounds ``[round(min_capacity^2), round((max_capacity_fraction*N)^2)]`` and
   ``[1, 2**32 - 1]`` (a premodulo is a uint32 modulo).

Regimes, from this step's ``|S|``: ``collapsed`` (``|S| >= tau``: lower the capacity, more
collisions), ``noisy`` (``|S| <= eps``: raise it) and ``gold`` (in between: fine-tune), with
``eps = noise_scale * sqrt(N)`` and ``tau = collapse_fraction * N``.

The forward pipeline uses the reference's schedule instead (``reference_premodulo``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kiln.hashtron.settings import CapacitySettings, GoldZoneSettings

MAX_PREMODULO = 2**32 - 1
REGIMES = ("noisy", "gold", "collapsed")


def zone_bounds(n: int, gold: GoldZoneSettings) -> tuple[float, float]:
    """``(eps, tau)``: the noise floor and the collapse threshold, in units of ``|S|``."""
    return gold.noise_scale * math.sqrt(n), gold.collapse_fraction * n


def regime(s: float, n: int, gold: GoldZoneSettings) -> str:
    """``collapsed`` if ``|S| >= tau``, ``noisy`` if ``|S| <= eps``, else ``gold``."""
    eps, tau = zone_bounds(n, gold)
    if abs(s) >= tau:
        return "collapsed"
    if abs(s) <= eps:
        return "noisy"
    return "gold"


@dataclass(frozen=True)
class CapacityDecision:
    """What the law decided for one neuron, step by step (see the module doc)."""

    sum_used: float  # |S| after damping
    target_capacity: float  # N / (|S| + 1), before bounds
    capacity: float  # after the capacity bounds
    target_premodulo: int  # round(capacity^2)
    premodulo: int  # after the change clamp and the final bounds
    clamped: bool  # premodulo != target_premodulo
    regime: str  # from this step's |S|

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return asdict(self)


def damped_sum(s: int, n: int, past_margins: Sequence[float], settings: CapacitySettings) -> float:
    """The ``|S|`` the law uses: this step's, or damped with the neuron's past margins.

    ``past_margins`` are ``|S|/N`` of the neuron's earlier runs, oldest first.
    """
    now = abs(s)
    if settings.damping == "moving_average":
        keep = settings.window - 1  # this step's |S| is the last of the window
        recent = [m * n for m in list(past_margins)[-keep:]] if keep else []
        return float(np.mean([*recent, now]))
    if settings.damping == "exponential" and past_margins:
        smooth = past_margins[0] * n
        for m in past_margins[1:]:
            smooth = settings.smoothing * m * n + (1 - settings.smoothing) * smooth
        return settings.smoothing * now + (1 - settings.smoothing) * smooth
    return float(now)


def capacity_bounds(n: int, settings: CapacitySettings) -> tuple[float, float]:
    """``(low, high)`` capacity: ``[min_capacity, max_capacity_fraction * N]``."""
    low = settings.min_capacity
    return low, max(low, settings.max_capacity_fraction * n)


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def _clamp_change(target: int, previous: int, settings: CapacitySettings) -> int:
    low, high = 1, MAX_PREMODULO
    if settings.max_change_factor > 0:
        low = max(low, math.floor(previous / settings.max_change_factor))
        high = min(high, math.ceil(previous * settings.max_change_factor))
    if settings.damping == "max_percent":
        share = settings.max_percent / 100.0
        low = max(low, math.floor(previous * (1.0 - share)) if share < 1 else 1)
        high = min(high, math.ceil(previous * (1.0 + share)))
    return min(max(target, low), high)


def decide_premodulo(
    s: int,
    n: int,
    *,
    previous: int | None,
    past_margins: Sequence[float] = (),
    settings: CapacitySettings | None = None,
    gold: GoldZoneSettings | None = None,
) -> CapacityDecision:
    """Apply the capacity law to a neuron with sum ``s`` over ``n`` samples.

    ``previous``: the neuron's last premodulo (None: its first run, no change clamp);
    ``past_margins``: its earlier margins, oldest first (for damping).
    """
    settings = settings or CapacitySettings()
    gold = gold or GoldZoneSettings()
    n = max(int(n), 1)
    used = damped_sum(s, n, past_margins, settings)
    target_cap = n / (used + 1.0)
    low, high = capacity_bounds(n, settings)
    cap = min(max(target_cap, low), high)
    target_pm = min(max(_round(cap * cap), 1), MAX_PREMODULO)
    premodulo = target_pm if previous is None else _clamp_change(target_pm, int(previous),
                                                                 settings)
    floor_pm = min(max(_round(low * low), 1), MAX_PREMODULO)
    ceil_pm = min(max(_round(high * high), 1), MAX_PREMODULO)
    premodulo = min(max(premodulo, floor_pm), ceil_pm)
    return CapacityDecision(used, target_cap, cap, target_pm, premodulo, premodulo != target_pm,
                            regime(s, n, gold))


def reference_premodulo(accuracy: float, n: int, low_factor: float, high_factor: float) -> int:
    """The reference's schedule: ``(100-acc)^2 * (min-max)/2500 + max``, floored at 2.

    ``accuracy`` in [0, 1]; ``min = low_factor * N`` (at 50%), ``max = high_factor * N`` (100%).
    """
    acc = 100.0 * accuracy
    low, high = low_factor * n, high_factor * n
    value = (100.0 - acc) ** 2 * (low - high) / 2500.0 + high
    return int(min(max(math.floor(value), 2), MAX_PREMODULO))


def premodulo_margin_r2(margins: np.ndarray, premodulos: np.ndarray, ns: np.ndarray,
                        *, log: bool = True) -> float:
    """R^2 of a least-squares line through (margin, premodulo) records.

    ``log`` (default) fits ``log(premodulo)`` against ``log(margin + 1/N)``: the capacity law
    makes that a line of slope -2, so R^2 measures how closely premodulos follow margins after
    clamps and damping. ``log=False`` fits the raw values. NaN for fewer than 3 records or no
    spread.
    """
    m = np.asarray(margins, dtype=np.float64)
    p = np.asarray(premodulos, dtype=np.float64)
    if m.size < 3:
        return math.nan
    if log:
        x = np.log(m + 1.0 / np.maximum(np.asarray(ns, dtype=np.float64), 1.0))
        y = np.log(np.maximum(p, 1.0))
    else:
        x, y = m, p
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    r = np.corrcoef(x, y)[0, 1]
    return float(r * r)
