"""The sum cache: an in-memory history of every neuron training's sum, margin and premodulo.

One record per neuron training (the spec's storage schema), held column by column in compact
numpy arrays (about 61 bytes a record) that grow by doubling:

    layer, position   int32    the neuron id "layer.position"
    run               int32    index into ``runs`` (the training run ids, e.g. the Kiln run id)
    epoch             int32    pipeline epoch
    phase             int8     0: bootstrap, 1: backward/forward training
    step              int64    pipeline step
    timestamp         float64  wall clock (unix seconds)       \\ not deterministic: never used
    duration          float32  seconds the training took       /  for decisions or comparisons
    s, n              int64    the sum S and the dataset size N
    premodulo         uint32   premodulo used for the training
    accuracy          float32  train accuracy after the training

The margin ``|S| / N`` is derived, not stored. Queries: ``latest``, ``history`` /
``margin_trend`` (last k runs of a neuron), ``latest_per_neuron`` and ``gold_zone`` (neurons whose
latest margin lies in the gold zone), ``margin_histogram`` / ``margin_distribution`` (per
layer). Pruning keeps the last ``keep_last`` records per neuron and at most ``max_records`` in
all; it runs when the record count passes a threshold that depends only on counts, so a cache
rebuilt from ``state_dict`` prunes at exactly the same points as one that never stopped.
History queries never look further back than ``keep_last`` runs, so what the pipeline decides
does not depend on when pruning last ran.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from numpy.typing import NDArray

from kiln.errors import CheckpointError
from kiln.hashtron.settings import CacheSettings, GoldZoneSettings

FORMAT = "kiln.hashtron.sum_cache"
VERSION = 1
COLUMNS: dict[str, type] = {
    "layer": np.int32, "position": np.int32, "run": np.int32, "epoch": np.int32,
    "phase": np.int8, "step": np.int64, "timestamp": np.float64, "duration": np.float32,
    "s": np.int64, "n": np.int64, "premodulo": np.uint32, "accuracy": np.float32,
}
WALL_CLOCK = ("timestamp", "duration")  # the only non-deterministic columns
DETERMINISTIC = tuple(c for c in COLUMNS if c not in WALL_CLOCK)
RECORD_BYTES = sum(np.dtype(t).itemsize for t in COLUMNS.values())
_MIN_CAPACITY = 64
_MIN_PRUNE_AT = 1024


def _neuron_key(layer: NDArray, position: NDArray) -> NDArray[np.int64]:
    return (layer.astype(np.int64) << 32) | position.astype(np.int64)


class SumCache:
    """Records of neuron trainings in numpy columns (see the module doc)."""

    def __init__(self, settings: CacheSettings | None = None, run_id: str = "") -> None:
        self.settings = settings or CacheSettings()
        self._cols = {name: np.zeros(_MIN_CAPACITY, dtype=t) for name, t in COLUMNS.items()}
        self._count = 0
        self.runs: list[str] = []
        self._run = self.set_run(run_id)
        self._prune_at = _MIN_PRUNE_AT

    # -- writing ---------------------------------------------------------------------------

    def set_run(self, run_id: str) -> int:
        """Make ``run_id`` the run that new records belong to; returns its index."""
        if run_id not in self.runs:
            self.runs.append(str(run_id))
        self._run = self.runs.index(run_id)
        return self._run

    def add(self, *, layer: int, position: int, s: int, n: int, premodulo: int,
            accuracy: float = float("nan"), epoch: int = 0, step: int = 0, phase: int = 1,
            duration: float = 0.0, timestamp: float | None = None) -> None:
        """Record one training of neuron ``layer.position``."""
        self.add_many(layer=[layer], position=[position], s=[s], n=[n], premodulo=[premodulo],
                      accuracy=[accuracy], epoch=[epoch], step=[step], phase=[phase],
                      duration=[duration], timestamp=None if timestamp is None else [timestamp])

    def add_many(self, *, layer: Any, position: Any, s: Any, n: Any, premodulo: Any,
                 accuracy: Any = float("nan"), epoch: Any = 0, step: Any = 0, phase: Any = 1,
                 duration: Any = 0.0, timestamp: Any = None) -> None:
        """Record a batch of trainings (arrays, or scalars broadcast to the batch)."""
        values = {"layer": layer, "position": position, "s": s, "n": n, "premodulo": premodulo,
                  "accuracy": accuracy, "epoch": epoch, "step": step, "phase": phase,
                  "duration": duration, "run": self._run,
                  "timestamp": time.time() if timestamp is None else timestamp}
        size = int(np.asarray(layer).size)
        if size == 0:
            return
        self._reserve(self._count + size)
        end = self._count + size
        for name, value in values.items():  # scalars broadcast over the batch
            self._cols[name][self._count:end] = np.asarray(value).ravel() if np.ndim(value) \
                else value
        self._count = end
        if self._count > min(self._prune_at, self.settings.max_records):
            self.prune()

    def _reserve(self, needed: int) -> None:
        capacity = self._cols["layer"].size
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        for name, arr in self._cols.items():
            grown = np.zeros(capacity, dtype=arr.dtype)
            grown[: self._count] = arr[: self._count]
            self._cols[name] = grown

    def prune(self) -> int:
        """Apply the retention policy now; returns the number of records dropped."""
        count = self._count
        key = _neuron_key(self._cols["layer"][:count], self._cols["position"][:count])
        rev = key[::-1]  # newest first, so a stable sort ranks each neuron's records by age
        order = np.argsort(rev, kind="stable")
        grouped = rev[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        sizes = np.diff(np.r_[starts, count])
        rank = np.arange(count) - np.repeat(starts, sizes)
        keep_rev = np.zeros(count, dtype=bool)
        keep_rev[order] = rank < self.settings.keep_last
        keep = keep_rev[::-1].copy()
        kept = np.flatnonzero(keep)
        if kept.size > self.settings.max_records:  # the oldest go first
            keep[kept[: kept.size - self.settings.max_records]] = False
        new_count = int(keep.sum())
        for arr in self._cols.values():
            arr[:new_count] = arr[:count][keep]
        self._count = new_count
        self._prune_at = new_count + max(new_count // 2, _MIN_PRUNE_AT)
        return count - new_count

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the columns (grows by doubling, shrinks never)."""
        return sum(arr.nbytes for arr in self._cols.values())

    @property
    def used_nbytes(self) -> int:
        """Bytes taken by the records held."""
        return self._count * RECORD_BYTES

    def column(self, name: str) -> NDArray:
        """A read-only view of column ``name`` over the records held, oldest first."""
        view = self._cols[name][: self._count]  # a view: read-only here, not in the cache
        view.setflags(write=False)
        return view

    def margins(self) -> NDArray[np.float64]:
        """``|S| / N`` of every record."""
        n = np.maximum(self.column("n"), 1).astype(np.float64)
        return np.abs(self.column("s")).astype(np.float64) / n

    def _record(self, row: int) -> dict[str, Any]:
        rec = {name: self._cols[name][row].item() for name in COLUMNS}
        rec["run"] = self.runs[rec["run"]]
        rec["neuron"] = f"{rec['layer']}.{rec['position']}"
        rec["margin"] = abs(rec["s"]) / max(rec["n"], 1)
        return rec

    def _rows(self, layer: int, position: int) -> NDArray[np.intp]:
        mask = (self.column("layer") == layer) & (self.column("position") == position)
        return np.flatnonzero(mask)

    def records(self, layer: int | None = None, position: int | None = None) -> list[dict]:
        """Records as dicts (oldest first), optionally of one layer or one neuron."""
        mask = np.ones(self._count, dtype=bool)
        if layer is not None:
            mask &= self.column("layer") == layer
        if position is not None:
            mask &= self.column("position") == position
        return [self._record(int(r)) for r in np.flatnonzero(mask)]

    def latest(self, layer: int, position: int) -> dict[str, Any] | None:
        """The newest record of neuron ``layer.position``, or None."""
        rows = self._rows(layer, position)
        return self._record(int(rows[-1])) if rows.size else None

    def history(self, layer: int, position: int, k: int | None = None) -> dict[str, NDArray]:
        """The neuron's last ``k`` records (at most ``keep_last``), column by column, oldest
        first; ``margin`` included."""
        k = self.settings.keep_last if k is None else min(k, self.settings.keep_last)
        rows = self._rows(layer, position)[-k:] if k > 0 else np.zeros(0, dtype=np.intp)
        out = {name: self._cols[name][rows].copy() for name in COLUMNS}
        out["margin"] = np.abs(out["s"]).astype(np.float64) / np.maximum(out["n"], 1)
        return out

    def margin_trend(self, layer: int, position: int, k: int = 5) -> tuple[NDArray, float]:
        """The neuron's margins over its last ``k`` runs and their least-squares slope per run
        (0 with fewer than two runs)."""
        margins = self.history(layer, position, k)["margin"]
        if margins.size < 2:
            return margins, 0.0
        slope = np.polyfit(np.arange(margins.size, dtype=np.float64), margins, 1)[0]
        return margins, float(slope)

    def latest_per_neuron(self, layer: int | None = None) -> dict[str, NDArray]:
        """The newest record of every neuron (of one layer), sorted by (layer, position)."""
        rows = np.arange(self._count) if layer is None else np.flatnonzero(
            self.column("layer") == layer)
        key = _neuron_key(self._cols["layer"][rows], self._cols["position"][rows])
        _, first = np.unique(key[::-1], return_index=True)  # first in reverse = newest
        latest = rows[::-1][first]
        out = {name: self._cols[name][latest].copy() for name in COLUMNS}
        out["margin"] = np.abs(out["s"]).astype(np.float64) / np.maximum(out["n"], 1)
        return out

    def gold_zone(self, gold: GoldZoneSettings | None = None,
                  layer: int | None = None) -> list[tuple[int, int, float]]:
        """``(layer, position, margin)`` of neurons whose latest ``|S|`` lies in the gold zone
        ``eps < |S| < tau``."""
        latest = self.latest_per_neuron(layer)
        mask = gold_mask(latest["s"], latest["n"], gold or GoldZoneSettings())
        return [(int(a), int(b), float(c)) for a, b, c in zip(
            latest["layer"][mask], latest["position"][mask], latest["margin"][mask],
            strict=True)]

    def margin_histogram(self, layer: int, bins: int | None = None) -> NDArray[np.int64]:
        """Counts of the layer's latest margins over ``bins`` equal bins of [0, 1] (margins
        above 1, possible with hamming votes, count in the last bin)."""
        bins = self.settings.histogram_bins if bins is None else bins
        margins = np.clip(self.latest_per_neuron(layer)["margin"], 0.0, 1.0)
        return np.histogram(margins, bins=bins, range=(0.0, 1.0))[0].astype(np.int64)

    def margin_distribution(self, layers: int) -> list[dict[str, Any]]:
        """Per layer ``0..layers-1``: neurons with a record, mean/min/max margin, histogram."""
        out = []
        for layer in range(layers):
            margins = self.latest_per_neuron(layer)["margin"]
            out.append({
                "layer": layer, "neurons": int(margins.size),
                "mean": float(margins.mean()) if margins.size else None,
                "min": float(margins.min()) if margins.size else None,
                "max": float(margins.max()) if margins.size else None,
                "histogram": self.margin_histogram(layer).tolist(),
            })
        return out

    # -- state -----------------------------------------------------------------------------

    def state_dict(self, *, deterministic_only: bool = False) -> dict[str, Any]:
        """Plain data for a checkpoint (``kiln.state_codec``); ``deterministic_only`` leaves
        out the wall-clock columns, for comparing two runs."""
        names = DETERMINISTIC if deterministic_only else tuple(COLUMNS)
        return {"format": FORMAT, "version": VERSION, "runs": list(self.runs), "run": self._run,
                "prune_at": self._prune_at,
                "columns": {name: self._cols[name][: self._count].copy() for name in names}}

    def load_state_dict(self, state: dict[str, Any], where: str = "sum cache") -> None:
        """Restore a ``state_dict``; ``CheckpointError`` says what is inconsistent."""
        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{where}: {what}; the checkpoint is corrupt or from another "
                                   "Kiln version: resume from an earlier checkpoint")

        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise bad(f"format is not {FORMAT!r}")
        if state.get("version") != VERSION:
            raise bad(f"version {state.get('version')!r} is not supported")
        cols = state.get("columns")
        if not isinstance(cols, dict) or set(cols) != set(COLUMNS):
            raise bad(f"columns must be exactly {sorted(COLUMNS)}")
        sizes = {np.asarray(c).shape for c in cols.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise bad("columns must be 1-D arrays of one length")
        for name, arr in cols.items():
            if not isinstance(arr, np.ndarray) or arr.dtype != COLUMNS[name]:
                raise bad(f"column {name!r} is not {np.dtype(COLUMNS[name]).name}")
        runs = state.get("runs")
        if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs) or not runs:
            raise bad("'runs' must be a non-empty list of run ids")
        count = int(next(iter(sizes))[0])
        if count and (cols["run"].min() < 0 or cols["run"].max() >= len(runs)):
            raise bad("a record refers to an unknown run")
        self.runs = list(runs)
        self._run = int(state["run"])
        self._prune_at = int(state["prune_at"])
        self._cols = {name: np.zeros(max(_MIN_CAPACITY, count), dtype=t)
                      for name, t in COLUMNS.items()}
        for name in COLUMNS:
            self._cols[name][:count] = cols[name]
        self._count = count


def gold_mask(s: NDArray, n: NDArray, gold: GoldZoneSettings) -> NDArray[np.bool_]:
    """Which sums lie strictly inside the gold zone ``eps < |S| < tau`` of their ``N``."""
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    eps, tau = gold.noise_scale * np.sqrt(n), gold.collapse_fraction * n  # as zone_bounds
    s_abs = np.abs(np.asarray(s, dtype=np.float64))
    return (s_abs > eps) & (s_abs < tau)


def measure_memory(neurons: int = 10_000, runs: int = 1_000, keep_last: int = 32,
                   layers: int = 4) -> dict[str, Any]:
    """Fill a cache with ``runs`` trainings of each of ``neurons`` neurons (one batch per run,
    pruning on) and report its size: allocated and used bytes, records, peak traced memory."""
    import tracemalloc

    settings = CacheSettings(keep_last=keep_last, max_records=max(neurons * keep_last, 1))
    rng = np.random.default_rng(0)
    per_layer = -(-neurons // layers)
    layer = (np.arange(neurons) // per_layer).astype(np.int32)
    position = (np.arange(neurons) % per_layer).astype(np.int32)
    tracemalloc.start()
    start = time.perf_counter()
    cache = SumCache(settings, run_id="memory-benchmark")
    for run in range(runs):
        s = rng.integers(-1000, 1001, neurons)
        cache.add_many(layer=layer, position=position, s=s, n=1000,
                       premodulo=rng.integers(1, 10**6, neurons), accuracy=0.5, epoch=run,
                       step=run, duration=0.0, timestamp=0.0)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"neurons": neurons, "runs": runs, "keep_last": keep_last, "inserted": neurons * runs,
            "records": len(cache), "allocated_bytes": cache.nbytes,
            "used_bytes": cache.used_nbytes, "peak_traced_bytes": peak, "seconds": seconds}
