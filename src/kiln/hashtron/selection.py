"""Which neuron of a layer trains next: the spec's margin priorities.

From each candidate neuron's latest record in the sum cache (``|S|`` over ``N``), with
``eps = noise_scale * sqrt(N)`` and ``tau = collapse_fraction * N``:

1. ``gold``: ``eps < |S| < tau``; the one whose margin is closest to the zone's middle
   ``(eps + tau) / 2N`` wins (highest information gain);
2. ``moderate``: outside the gold zone but within ``moderate_low_scale * sqrt(N) < |S| <=
   moderate_high_fraction * N``; the one closest to the gold zone wins;
3. ``explore``: any other candidate (no record yet, deep noise or deep collapse), drawn with the
   pipeline's seeded generator.

Ties go to the lower position, so the choice is a pure function of the cache and the RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kiln.hashtron.settings import GoldZoneSettings
from kiln.hashtron.sum_cache import SumCache

TIERS = ("gold", "moderate", "explore")


@dataclass(frozen=True)
class Selection:
    """The chosen neuron ``position``, the ``tier`` it came from and its latest margin."""

    position: int
    tier: str
    margin: float | None


def rank_candidates(
    cache: SumCache, layer: int, candidates: Sequence[int], gold: GoldZoneSettings
) -> tuple[list[int], list[int], list[int]]:
    """``(gold, moderate, explore)`` positions among ``candidates``: the first two in priority
    order, the last sorted by position."""
    latest = cache.latest_per_neuron(layer)
    wanted = np.zeros(max([*candidates, -1]) + 1, dtype=bool)
    wanted[list(candidates)] = True
    keep = (latest["position"] < wanted.size)
    keep[keep] = wanted[latest["position"][keep]]
    pos = latest["position"][keep].astype(np.int64)
    n = np.maximum(latest["n"][keep], 1).astype(np.float64)
    margin = latest["margin"][keep]
    s_abs = margin * n
    eps, tau = gold.noise_scale * np.sqrt(n), gold.collapse_fraction * n
    in_gold = (s_abs > eps) & (s_abs < tau)
    low, high = gold.moderate_low_scale * np.sqrt(n), gold.moderate_high_fraction * n
    in_moderate = ~in_gold & (s_abs > low) & (s_abs <= high)
    middle = (eps + tau) / (2 * n)
    gold_order = np.lexsort((pos[in_gold], np.abs(margin - middle)[in_gold]))
    gap = np.maximum(np.maximum(eps / n - margin, margin - tau / n), 0.0)  # distance to zone
    mod_order = np.lexsort((pos[in_moderate], gap[in_moderate]))
    ranked = {int(p) for p in pos[in_gold | in_moderate]}
    explore = sorted(int(c) for c in candidates if int(c) not in ranked)
    return ([int(p) for p in pos[in_gold][gold_order]],
            [int(p) for p in pos[in_moderate][mod_order]], explore)


def select_neuron(
    cache: SumCache,
    layer: int,
    candidates: Sequence[int],
    gold: GoldZoneSettings,
    rng: np.random.Generator,
) -> Selection:
    """The next neuron of ``layer`` to train among ``candidates`` (see the module doc)."""
    if not candidates:
        raise ValueError("select_neuron needs at least one candidate")
    gold_pos, moderate, explore = rank_candidates(cache, layer, candidates, gold)
    if gold_pos:
        position, tier = gold_pos[0], "gold"
    elif moderate:
        position, tier = moderate[0], "moderate"
    else:
        position, tier = explore[int(rng.integers(len(explore)))], "explore"
    latest = cache.latest(layer, position)
    return Selection(position, tier, None if latest is None else latest["margin"])
