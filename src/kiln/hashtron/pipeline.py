"""The hashtron training pipelines: one step trains one neuron; the pipeline picks which.

One step: pick ``(layer, neuron)`` -> tally it over the training set (flip test: the sum ``S``
over ``N`` samples) -> decide its premodulo -> fit a filter under the program
``[(salt, premodulo)]`` -> install it -> measure accuracy -> record to the sum cache -> alerts.

``direction: backward`` (the spec's pipeline):

- phase 0: every neuron of the final layer trains once, in order, with premodulo ``N`` (or
  ``bootstrap_premodulo``): heavy collisions, so it learns the dataset prior (the bias);
- phase 1: sweeps over the layers from the final one to the first. A layer visit trains
  ``ceil(visit_fraction * width)`` distinct neurons, each picked by margin priority (gold zone,
  then moderate, then seeded exploration; ``selection``), with the capacity law's premodulo
  (``capacity``). One sweep is one epoch.

``direction: forward`` (the reference's order, the baseline): while train accuracy is below
``forward_threshold`` a plan is a random branch (one random neuron per layer, input to output);
from then on, all neurons of a random layer in shuffled order (the reference trains them in
pairs; here the two of a pair train one after the other). Premodulos follow the reference's
accuracy schedule, read with the per-bit accuracy of the output code so that 50% means chance
for multi-bit labels too (with the exact accuracy, a 10-class task starts far below 50% and the
schedule pins every premodulo to its floor of 2). An epoch is as many trainings as the network
has neurons.

A neuron with no voters (it cannot change any output) is recorded but left as it is. A fit that
fails (filter build error) or runs past ``step_timeout_s`` is undone and retried with a fresh
salt; after ``max_attempts`` failures the neuron is skipped and the pipeline moves on, so it
never loops forever.

Everything that decides the future is in ``state_dict()`` (network, sum cache, RNG, phase,
position in the order, attempt counters, alert state), so a pipeline rebuilt with
``load_state_dict`` at a step boundary continues exactly like one that never stopped. Wall
clock (timestamps, durations) never feeds a decision, except a timeout when one fires.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kiln.errors import CheckpointError, DataError
from kiln.hashtron.alerts import Alert, AlertMonitor
from kiln.hashtron.capacity import (
    CapacityDecision,
    decide_premodulo,
    premodulo_margin_r2,
    reference_premodulo,
    regime,
)
from kiln.hashtron.network import Network, as_features, as_labels, pack_code
from kiln.hashtron.neuron import Neuron
from kiln.hashtron.selection import select_neuron
from kiln.hashtron.serialize import network_from_state, network_state
from kiln.hashtron.settings import HashtronSettings
from kiln.hashtron.sum_cache import SumCache, gold_mask
from kiln.hashtron.tally import tally_features

FORMAT = "kiln.hashtron.pipeline"
VERSION = 1
OUTCOMES = ("trained", "no_voters", "failed", "skipped")


@dataclass
class StepReport:
    """What one step did: one metrics row (``to_dict``) plus alert events (``alerts``)."""

    step: int  # steps done, this one included
    epoch: int  # epoch this step belongs to
    phase: int  # 0: bootstrap, 1: training
    direction: str
    layer: int
    neuron: int
    tier: str  # bootstrap | gold | moderate | explore | branch | pairs
    attempt: int  # 1-based attempt on this neuron
    outcome: str  # one of OUTCOMES
    s: int
    n: int
    margin: float
    regime: str
    voters: int
    keys: int  # keys in the neuron's training set
    premodulo: int
    target_premodulo: int
    target_capacity: float | None
    clamped: bool
    train_accuracy: float
    eval_accuracy: float | None
    gold_per_layer: list[int]
    margin_histogram: list[list[int]]  # per layer, bins over [0, 1]
    filter_bytes: int
    epoch_end: bool
    done: bool
    duration_s: float  # wall clock: not deterministic
    alerts: list[Alert] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The metrics row: JSON-able values, alerts left out (write them as events)."""
        row = asdict(self)
        row.pop("alerts")
        return row

    def log_line(self) -> str:
        """One human-readable line; the regime shows whether the neuron was collapsed,
        noisy or in the gold zone."""
        ev = "" if self.eval_accuracy is None else f" eval {self.eval_accuracy:.4f}"
        return (f"step {self.step} epoch {self.epoch} phase {self.phase} neuron "
                f"{self.layer}.{self.neuron} ({self.tier}, attempt {self.attempt}) "
                f"{self.outcome}: S={self.s} N={self.n} margin {self.margin:.4f} "
                f"regime {self.regime} premodulo {self.premodulo}"
                f"{' (clamped)' if self.clamped else ''} train {self.train_accuracy:.4f}{ev}")


def data_fingerprint(x: NDArray, y: NDArray) -> str:
    """SHA-256 of features and labels (shapes included): ties a checkpoint to its data."""
    h = hashlib.sha256()
    for arr in (x, y):
        h.update(repr((arr.dtype.str, arr.shape)).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class _Split:
    """A dataset split with each layer's input features and output bits cached; training a
    neuron updates its own column of bits and drops what lies after its layer."""

    def __init__(self, x: ArrayLike, y: ArrayLike, bits: int, where: str) -> None:
        self.x = as_features(x, f"{where} features")
        if self.x.shape[0] == 0:
            raise DataError(f"{where}: the dataset has no samples; give it at least one")
        self.y = as_labels(y, self.x.shape[0], bits, f"{where} labels")
        self.fingerprint = data_fingerprint(self.x, self.y)
        self.feats: list[NDArray[np.uint32] | None] = []
        self.bits: list[NDArray[np.bool_] | None] = []

    def reset(self, layers: int) -> None:
        self.feats = [self.x] + [None] * (layers - 1)
        self.bits = [None] * layers

    def features(self, net: Network, layer: int) -> NDArray[np.uint32]:
        """What layer ``layer`` reads ``[N, F]``."""
        start = max(i for i in range(layer + 1) if self.feats[i] is not None)
        for i in range(start, layer):
            self.feats[i + 1] = net.combine(i, self.layer_bits(net, i))
        feats = self.feats[layer]
        assert feats is not None
        return feats

    def layer_bits(self, net: Network, layer: int) -> NDArray[np.bool_]:
        """What layer ``layer`` outputs ``[N, width]``."""
        bits = self.bits[layer]
        if bits is None:
            bits = self.bits[layer] = net.layers[layer].forward(self.features(net, layer))
        return bits

    def neuron_changed(self, net: Network, layer: int, index: int) -> None:
        """Neuron ``index`` of ``layer`` was replaced: refresh its bits, drop later layers."""
        feats, bits = self.feats[layer], self.bits[layer]
        if feats is not None and bits is not None:
            net_layer = net.layers[layer]
            bits[:, index] = net_layer.neurons[index].bit(net_layer.neuron_inputs(feats, index))
        for i in range(layer + 1, len(self.feats)):
            self.feats[i] = self.bits[i] = None

    def accuracy(self, net: Network) -> tuple[float, float]:
        """``(exact, per-bit)`` accuracy of the output codes."""
        codes = pack_code(self.layer_bits(net, len(net.layers) - 1))
        wrong = np.bitwise_count(codes ^ self.y) if hasattr(np, "bitwise_count") else \
            np.array([bin(int(v)).count("1") for v in codes ^ self.y])
        return float(np.mean(codes == self.y)), 1.0 - float(np.mean(wrong)) / net.output_bits


class HashtronPipeline:
    """Trains ``network`` on ``train`` one neuron per ``step()`` (see the module doc).

    ``train`` / ``eval``: ``(features, labels)``; ``eval`` may be None. ``seed`` seeds the
    pipeline's generator (salts, exploration, forward plans); ``run_id`` labels cache records.
    """

    def __init__(self, network: Network, train: tuple[ArrayLike, ArrayLike],
                 eval: tuple[ArrayLike, ArrayLike] | None = None,
                 settings: HashtronSettings | None = None, *, seed: int | Sequence[int] = 0,
                 run_id: str = "") -> None:
        self.settings = settings or HashtronSettings()
        self.network = network
        self.train = _Split(*train, network.output_bits, "training set")
        self.eval = None if eval is None else _Split(*eval, network.output_bits, "eval set")
        if self.eval is not None and self.eval.x.shape[1] != self.train.x.shape[1]:
            raise DataError(f"eval set has {self.eval.x.shape[1]} features per sample, the "
                            f"training set {self.train.x.shape[1]}; use the same feature map")
        if network.n_features not in (None, self.train.x.shape[1]):
            raise DataError(f"training set has {self.train.x.shape[1]} features per sample, the "
                            f"network reads {network.n_features}; build it for this data")
        self.rng = np.random.default_rng(seed)
        self.cache = SumCache(self.settings.cache, run_id)
        self.monitor = AlertMonitor(self.settings.alerts)
        backward = self.settings.pipeline.direction == "backward"
        self.step_count = 0
        self.epoch = 0
        self.phase = 0 if backward else 1
        self.cursor = 0  # backward: index into the layer order; forward: trainings this epoch
        self.visit = 0  # layer visits started (stuck alert: once per visit)
        self.visit_done: list[int] = []  # neurons trained (or skipped) in this visit
        self.visit_steps = 0  # steps spent in this visit, failed attempts included
        self.current: tuple[int, int, str] | None = None  # neuron being retried
        self.attempts = 0  # failed attempts on ``current``
        self.plan: list[tuple[int, int, str]] = []  # forward: what trains next
        self.train_accuracy: float | None = None
        self.train_bit_accuracy = 0.0
        self.eval_accuracy: float | None = None
        self.finished = False
        self._reset_features()

    # -- order ----------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        """Layers in the network."""
        return len(self.network.layers)

    @property
    def done(self) -> bool:
        """True once the configured epochs (or ``max_steps``) are done."""
        return self.finished

    def _planned(self, layer: int) -> int:
        width = self.network.layers[layer].width
        if self.settings.pipeline.direction == "forward":
            return 1  # a forward "visit" is one plan entry
        if self.phase == 0:
            return width
        return max(1, math.ceil(self.settings.pipeline.visit_fraction * width))

    def _backward_layer(self) -> int:
        return self.n_layers - 1 if self.phase == 0 else self.n_layers - 1 - self.cursor

    def _next_neuron(self) -> tuple[int, int, str]:
        if self.current is not None:
            return self.current
        if self.settings.pipeline.direction == "forward":
            if not self.plan:
                self._make_plan()
            return self.plan[0]
        layer = self._backward_layer()
        width = self.network.layers[layer].width
        done = set(self.visit_done)
        remaining = [i for i in range(width) if i not in done]
        if self.phase == 0:
            return layer, remaining[0], "bootstrap"
        chosen = select_neuron(self.cache, layer, remaining, self.settings.gold_zone, self.rng)
        return layer, chosen.position, chosen.tier

    def _make_plan(self) -> None:
        acc = self._train_accuracy()
        if acc >= self.settings.pipeline.forward_threshold:
            layer = int(self.rng.integers(self.n_layers))
            order = self.rng.permutation(self.network.layers[layer].width)
            self.plan = [(layer, int(i), "pairs") for i in order]
        else:
            self.plan = [(layer, int(self.rng.integers(self.network.layers[layer].width)),
                          "branch") for layer in range(self.n_layers)]

    def _advance(self) -> bool:
        """Move past the neuron just trained or skipped; True at an epoch end."""
        self.current, self.attempts = None, 0
        if self.settings.pipeline.direction == "forward":
            self.plan.pop(0)
            self.visit_done, self.visit_steps = [], 0
            self.visit += 1
            self.cursor += 1
            if self.cursor >= self.network.n_neurons:
                self.cursor = 0
                return True
            return False
        layer = self._backward_layer()
        if len(self.visit_done) < self._planned(layer):
            return False
        self.visit_done, self.visit_steps = [], 0
        self.visit += 1
        if self.phase == 0:
            self.phase = 1
            return False
        self.cursor += 1
        if self.cursor >= self.n_layers:
            self.cursor = 0
            return True
        return False

    # -- one step -------------------------------------------------------------------------

    def _reset_features(self) -> None:
        for split in (self.train, self.eval):
            if split is not None:
                split.reset(self.n_layers)

    def _train_accuracy(self) -> float:
        if self.train_accuracy is None:
            self.train_accuracy, self.train_bit_accuracy = self.train.accuracy(self.network)
        return self.train_accuracy

    def _decide(self, layer: int, neuron: int, s: int, n: int) -> CapacityDecision:
        p = self.settings.pipeline
        gold = self.settings.gold_zone
        if p.direction == "forward":
            self._train_accuracy()  # the schedule reads the per-bit accuracy: 50% = chance
            pm = reference_premodulo(self.train_bit_accuracy, n, p.forward_premodulo_min,
                                     p.forward_premodulo_max)
            return CapacityDecision(float(abs(s)), math.nan, math.nan, pm, pm, False,
                                    regime(s, n, gold))
        if self.phase == 0:
            pm = min(max(p.bootstrap_premodulo or n, 1), 2**32 - 1)
            return CapacityDecision(float(abs(s)), math.nan, math.nan, pm, pm, False,
                                    regime(s, n, gold))
        hist = self.cache.history(layer, neuron)
        previous = int(hist["premodulo"][-1]) if hist["premodulo"].size else None
        return decide_premodulo(s, n, previous=previous, past_margins=hist["margin"].tolist(),
                                settings=self.settings.capacity, gold=gold)

    def step(self) -> StepReport:
        """Train one neuron (or make one attempt at it); see the module doc."""
        if self.finished:
            raise RuntimeError("the pipeline is done; build a new one to train further")
        start = time.perf_counter()
        p = self.settings.pipeline
        layer, neuron, tier = self._next_neuron()
        self.step_count += 1
        self.visit_steps += 1
        net_layer = self.network.layers[layer]
        t = tally_features(self.network, self.train.features(self.network, layer), self.train.y,
                           layer, neuron, bits=self.train.layer_bits(self.network, layer),
                           vote=p.vote)
        s, n = t.total, t.n
        decision = self._decide(layer, neuron, s, n)
        salt = int(self.rng.integers(0, 2**32, dtype=np.uint64))
        program = ((salt, decision.premodulo),)
        keys, wanted = t.rekeyed(program).training_set()
        alerts: list[Alert] = []
        outcome = "no_voters" if keys.size == 0 else "trained"
        if outcome == "trained":
            fit_start = time.perf_counter()
            try:
                trained: Neuron | None = Neuron(program).fit(keys, wanted)
                problem = ""
            except DataError as exc:  # e.g. no filter fits within 2**32 cells
                trained, problem = None, str(exc)
            fit_s = time.perf_counter() - fit_start
            if trained is not None and p.step_timeout_s and fit_s > p.step_timeout_s:
                trained = None
                problem = f"fit took {fit_s:.1f} s > step_timeout_s {p.step_timeout_s}"
            if trained is None:
                outcome = "failed"
                self.attempts += 1
                self.current = (layer, neuron, tier)
                alerts.append(Alert("attempt_failed", self.step_count,
                                    f"neuron {layer}.{neuron} attempt {self.attempts}: {problem}",
                                    {"neuron": f"{layer}.{neuron}", "attempt": self.attempts}))
                if self.attempts >= p.max_attempts:
                    outcome = "skipped"
                    alerts.append(Alert("neuron_skipped", self.step_count,
                                        f"neuron {layer}.{neuron} skipped after {self.attempts} "
                                        "failed attempts; the pipeline moves on",
                                        {"neuron": f"{layer}.{neuron}"}))
            else:
                net_layer.set_neuron(neuron, trained)
                for split in (self.train, self.eval):
                    if split is not None:
                        split.neuron_changed(self.network, layer, neuron)
                self.train_accuracy = None
        attempt = self.attempts if outcome in ("failed", "skipped") else self.attempts + 1
        train_acc = self._train_accuracy()
        duration = time.perf_counter() - start
        if outcome in ("trained", "no_voters"):
            self.cache.add(layer=layer, position=neuron, s=s, n=n,
                           premodulo=decision.premodulo, accuracy=train_acc, epoch=self.epoch,
                           step=self.step_count, phase=self.phase, duration=duration)
        epoch_of_step, phase_of_step = self.epoch, self.phase
        visit, visit_steps, planned = self.visit, self.visit_steps, self._planned(layer)
        epoch_end = False
        if outcome != "failed":
            self.visit_done.append(neuron)
            epoch_end = self._advance()
        alerts += self.monitor.check_step(
            step=self.step_count, train_accuracy=train_acc, layer=layer, position=neuron,
            recent_premodulos=self.cache.history(layer, neuron,
                                                 self.settings.alerts.oscillation_window)
            ["premodulo"].tolist(),
            visit=visit, visit_steps=visit_steps, visit_planned=planned)
        latest = self.cache.latest_per_neuron()
        if epoch_end:
            mean = float(latest["margin"].mean()) if latest["margin"].size else None
            alerts += self.monitor.check_epoch(step=self.step_count, epoch=self.epoch,
                                               mean_margin=mean)
            self.epoch += 1
        if (self.epoch >= p.epochs and epoch_end) or (p.max_steps
                                                       and self.step_count >= p.max_steps):
            self.finished = True
        eval_acc = None
        if self.eval is not None and (epoch_end or self.finished or (
                p.eval_every_steps and self.step_count % p.eval_every_steps == 0)):
            eval_acc = self.eval_accuracy = self.eval.accuracy(self.network)[0]
        gold_counts, hists = self._layer_summaries(latest)
        return StepReport(
            step=self.step_count, epoch=epoch_of_step, phase=phase_of_step,
            direction=p.direction, layer=layer, neuron=neuron, tier=tier, attempt=attempt,
            outcome=outcome, s=s, n=n, margin=abs(s) / n, regime=decision.regime,
            voters=t.voters, keys=int(keys.size), premodulo=decision.premodulo,
            target_premodulo=decision.target_premodulo,
            target_capacity=None if math.isnan(decision.target_capacity)
            else decision.target_capacity,
            clamped=decision.clamped, train_accuracy=train_acc, eval_accuracy=eval_acc,
            gold_per_layer=gold_counts, margin_histogram=hists,
            filter_bytes=self.network.layers[layer].neurons[neuron].nbytes,
            epoch_end=epoch_end, done=self.finished, duration_s=time.perf_counter() - start,
            alerts=alerts)

    def _layer_summaries(self, latest: dict[str, NDArray]) -> tuple[list[int], list[list[int]]]:
        bins = self.settings.cache.histogram_bins
        gold = gold_mask(latest["s"], latest["n"], self.settings.gold_zone)
        counts = np.bincount(latest["layer"][gold], minlength=self.n_layers)
        hists = []
        for layer in range(self.n_layers):
            m = np.clip(latest["margin"][latest["layer"] == layer], 0.0, 1.0)
            hists.append(np.histogram(m, bins=bins, range=(0.0, 1.0))[0].tolist())
        return [int(c) for c in counts[: self.n_layers]], hists

    def run(self, max_steps: int | None = None) -> list[StepReport]:
        """Step until done (or ``max_steps`` more steps); returns the reports."""
        reports = []
        while not self.finished and (max_steps is None or len(reports) < max_steps):
            reports.append(self.step())
        return reports

    # -- results --------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float | None]:
        """Current train and eval accuracy."""
        return {"train_accuracy": self._train_accuracy(),
                "eval_accuracy": None if self.eval is None else self.eval.accuracy(self.network)[0]}

    def summary(self) -> dict[str, Any]:
        """End-of-run numbers (for ``metrics.json``): steps, epochs, accuracies, the gap,
        the premodulo/margin R^2, cache size and gold-zone neurons per layer."""
        acc = self.evaluate()
        train, ev = acc["train_accuracy"], acc["eval_accuracy"]
        r2 = self.premodulo_margin_r2()
        latest = self.cache.latest_per_neuron()
        gold, _ = self._layer_summaries(latest)
        return {"direction": self.settings.pipeline.direction, "steps": self.step_count,
                "epochs": self.epoch, "done": self.finished, "train_accuracy": train,
                "eval_accuracy": ev, "generalisation_gap": None if ev is None else train - ev,
                "premodulo_margin_r2": None if math.isnan(r2) else r2,
                "cache_records": len(self.cache), "cache_bytes": self.cache.used_nbytes,
                "gold_per_layer": gold, "network_bytes": self.network.nbytes}

    def premodulo_margin_r2(self, *, log: bool = True, phase: int | None = 1) -> float:
        """R^2 between margins and premodulos over the cache's records (of ``phase``)."""
        mask = np.ones(len(self.cache), dtype=bool) if phase is None else \
            self.cache.column("phase") == phase
        return premodulo_margin_r2(self.cache.margins()[mask],
                                   self.cache.column("premodulo")[mask],
                                   self.cache.column("n")[mask], log=log)

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the future, as JSON values and numpy arrays."""
        rng = self.rng.bit_generator.state
        return {
            "format": FORMAT, "version": VERSION,
            "direction": self.settings.pipeline.direction,
            "network": network_state(self.network),
            "cache": self.cache.state_dict(),
            "rng": {"bit_generator": rng["bit_generator"],
                    "state": {k: hex(v) for k, v in rng["state"].items()},
                    "has_uint32": int(rng["has_uint32"]), "uinteger": int(rng["uinteger"])},
            "alerts": self.monitor.state_dict(),
            "counters": {"step": self.step_count, "epoch": self.epoch, "phase": self.phase,
                         "cursor": self.cursor, "visit": self.visit,
                         "visit_done": list(self.visit_done), "visit_steps": self.visit_steps,
                         "current": None if self.current is None else list(self.current),
                         "attempts": self.attempts, "plan": [list(e) for e in self.plan],
                         "finished": self.finished, "eval_accuracy": self.eval_accuracy},
            "data": {"train": self.train.fingerprint,
                     "eval": None if self.eval is None else self.eval.fingerprint},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict``; ``CheckpointError`` if it does not fit this
        pipeline's data or settings."""
        if not isinstance(state, dict) or state.get("format") != FORMAT \
                or state.get("version") != VERSION:
            raise CheckpointError("hashtron pipeline state: not a Kiln hashtron pipeline state "
                                  f"of version {VERSION}; resume from a matching checkpoint")
        if state["direction"] != self.settings.pipeline.direction:
            raise CheckpointError(f"hashtron pipeline state was saved by a {state['direction']}"
                                  f" pipeline, this one is {self.settings.pipeline.direction}; "
                                  "resume with the run's own config")
        data = state["data"]
        mine = {"train": self.train.fingerprint,
                "eval": None if self.eval is None else self.eval.fingerprint}
        if data != mine:
            raise CheckpointError("hashtron pipeline state was saved for other data (the "
                                  "train/eval fingerprints differ); resume with the same task, "
                                  "options and split as the run that saved it")
        network = network_from_state(state["network"], "hashtron pipeline network")
        if network.output_bits != self.network.output_bits:
            raise CheckpointError("hashtron pipeline network has another output width than "
                                  "this run's; resume with the run's own config")
        self.network = network
        self.cache.load_state_dict(state["cache"], "hashtron sum cache")
        rng = state["rng"]
        self.rng.bit_generator.state = {
            "bit_generator": rng["bit_generator"],
            "state": {k: int(v, 16) for k, v in rng["state"].items()},
            "has_uint32": int(rng["has_uint32"]), "uinteger": int(rng["uinteger"])}
        self.monitor.load_state_dict(state["alerts"])
        c = state["counters"]
        self.step_count, self.epoch, self.phase = int(c["step"]), int(c["epoch"]), int(c["phase"])
        self.cursor, self.visit = int(c["cursor"]), int(c["visit"])
        self.visit_done = [int(v) for v in c["visit_done"]]
        self.visit_steps, self.attempts = int(c["visit_steps"]), int(c["attempts"])
        self.current = None if c["current"] is None else (
            int(c["current"][0]), int(c["current"][1]), str(c["current"][2]))
        self.plan = [(int(a), int(b), str(t)) for a, b, t in c["plan"]]
        self.finished = bool(c["finished"])
        # the last eval measured (checkpoint metadata reports it between evals); train accuracy
        # is recomputed when needed. States saved before it was recorded have none.
        last_eval = c.get("eval_accuracy")
        self.eval_accuracy = None if last_eval is None else float(last_eval)
        self.train_accuracy = None
        self._reset_features()
