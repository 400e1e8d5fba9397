"""Every parameter of the hashtron pipelines, with its default, as frozen dataclasses.

``HashtronSettings`` groups one dataclass per concern, mirroring a ``hashtron:`` config section::

    hashtron:
      task:      {name, eval_fraction, split_seed, options}      what is trained (tasks.py)
      layers:    [{width, premodulo, combiner}, ...] | null       network shape (null: task default)
      pipeline:  direction, epochs, max_steps, ...                the order of neuron trainings
      capacity:  damping, max_change_factor, ...                  the capacity law (capacity.py)
      gold_zone: noise_scale, collapse_fraction, ...              neuron selection (selection.py)
      cache:     keep_last, max_records, histogram_bins           the sum cache (sum_cache.py)
      alerts:    train_accuracy, stagnation_epochs, ...           alert thresholds (alerts.py)

``HashtronSettings.from_dict`` validates a plain mapping (unknown keys and bad values raise
``ConfigError`` naming the key path); ``to_dict`` gives it back. Each field's ``metadata["doc"]``
says what it means; ``settings_table`` lists every field for documentation. ``TEMPLATES`` holds
ready-made variants (backward, forward, gentle, aggressive).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kiln.errors import ConfigError

DIRECTIONS = ("backward", "forward")
DAMPINGS = ("none", "moving_average", "exponential", "max_percent")
VOTES = ("sign", "hamming", "correct")


def _fail(where: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{where}: got {value!r}, expected {expected}")


def _check_number(where: str, value: Any, *, low: float | None = None,
                  high: float | None = None, integer: bool = False,
                  low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, value, "an integer" if integer else "a number")
    if integer and not isinstance(value, int):
        raise _fail(where, value, "an integer")
    if not math.isfinite(value):
        raise _fail(where, value, "a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise _fail(where, value, f"a value {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise _fail(where, value, f"a value <= {high}")


def check_int(where: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """Raise ``ConfigError`` naming ``where`` unless ``value`` is an int (not a bool, a float or
    a string) in ``[low, high]``."""
    _check_number(where, value, low=low, high=high, integer=True)


def _check_choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(where, value, f"one of {list(choices)}")


@dataclass(frozen=True)
class TaskSettings:
    """The dataset a run trains on and its train/eval split (see ``kiln.hashtron.tasks``)."""

    name: str = "isalnum"
    eval_fraction: float = 0.25
    split_seed: int = 0
    options: dict = field(default_factory=dict)

    DOCS: ClassVar[dict[str, str]] = {
        "name": (
            "Task: isalnum, isdigit, isupper, ispunct, isxdigit, isspace, squareroot, "
            "majority, digits, mnist_idx, csv, jsonl."),
        "eval_fraction": (
            "Share of the samples held out for evaluation (seeded split); 0: no eval set."),
        "split_seed": (
            "Seed of the train/eval split (independent of the run seed)."),
        "options": (
            "Task options, e.g. {n: 1024} for squareroot, {path: FILE} for csv/jsonl, {root: "
            "DIR} for mnist_idx, {features: 32} for digits."),
    }

    def check(self, where: str = "hashtron.task") -> None:
        """Raise ``ConfigError`` on an out-of-range value."""
        if not isinstance(self.name, str) or not self.name:
            raise _fail(f"{where}.name", self.name, "a task name")
        _check_number(f"{where}.eval_fraction", self.eval_fraction, low=0.0, high=0.9)
        _check_number(f"{where}.split_seed", self.split_seed, low=0, integer=True)
        if not isinstance(self.options, dict):
            raise _fail(f"{where}.options", self.options, "a mapping")


@dataclass(frozen=True)
class PipelineSettings:
    """Which neuron trains when, and how each training step runs."""

    direction: str = "backward"
    epochs: int = 3
    max_steps: int = 0
    visit_fraction: float = 1.0
    bootstrap_premodulo: int = 0
    vote: str = "sign"
    max_attempts: int = 3
    step_timeout_s: float = 600.0
    eval_every_steps: int = 1
    forward_threshold: float = 0.9
    forward_premodulo_min: float = 1.0
    forward_premodulo_max: float = 16.0

    DOCS: ClassVar[dict[str, str]] = {
        "direction": (
            "backward: the spec's pipeline (phase 0 bootstrap of the final layer, then layers "
            "final -> first, neurons by margin); forward: the reference's order (random "
            "branch, later a random layer in pairs) with its accuracy-scheduled premodulo."),
        "epochs": (
            "Backward: full backward sweeps over the layers; forward: the same number of "
            "neuron trainings (epochs x neurons)."),
        "max_steps": (
            "Stop after this many steps (neuron trainings, failed attempts included); 0: no "
            "cap beyond epochs."),
        "visit_fraction": (
            "Backward: share of a layer's neurons trained per visit (at least one), picked by "
            "margin priority."),
        "bootstrap_premodulo": (
            "Phase 0 premodulo of the final layer's neurons; 0: N (the training-set size), as "
            "the spec says."),
        "vote": (
            "Flip-test vote: sign (S in [-N, N]), hamming (weighted by the Hamming change) or "
            "correct (only exact outputs vote)."),
        "max_attempts": (
            "Failed attempts (timeout or failed filter build) on one neuron before the "
            "pipeline skips it and moves on."),
        "step_timeout_s": (
            "Wall-clock limit of one neuron's fit; a slower fit is undone and counts as a "
            "failed attempt (a run where this fires is not reproducible; it is logged). 0 "
            "disables."),
        "eval_every_steps": (
            "Measure eval accuracy every N steps (and at every epoch end); 0: only at epoch "
            "ends."),
        "forward_threshold": (
            "Forward: train accuracy from which a step plan is a random layer in shuffled "
            "pairs instead of a random branch."),
        "forward_premodulo_min": (
            "Forward: premodulo at 50% train accuracy, in units of N (reference schedule)."),
        "forward_premodulo_max": (
            "Forward: premodulo at 100% train accuracy, in units of N (reference schedule)."),
    }

    def check(self, where: str = "hashtron.pipeline") -> None:
        """Raise ``ConfigError`` on an out-of-range value."""
        _check_choice(f"{where}.direction", self.direction, DIRECTIONS)
        _check_number(f"{where}.epochs", self.epochs, low=1, integer=True)
        _check_number(f"{where}.max_steps", self.max_steps, low=0, integer=True)
        _check_number(f"{where}.visit_fraction", self.visit_fraction, low=0.0, high=1.0,
                      low_open=True)
        _check_number(f"{where}.bootstrap_premodulo", self.bootstrap_premodulo, low=0,
                      high=2**32 - 1, integer=True)
        _check_choice(f"{where}.vote", self.vote, VOTES)
        _check_number(f"{where}.max_attempts", self.max_attempts, low=1, integer=True)
        _check_number(f"{where}.step_timeout_s", self.step_timeout_s, low=0.0)
        _check_number(f"{where}.eval_every_steps", self.eval_every_steps, low=0, integer=True)
        _check_number(f"{where}.forward_threshold", self.forward_threshold, low=0.0, high=1.0)
        _check_number(f"{where}.forward_premodulo_min", self.forward_premodulo_min, low=0.0,
                      low_open=True)
        _check_number(f"{where}.forward_premodulo_max", self.forward_premodulo_max, low=0.0,
                      low_open=True)


@dataclass(frozen=True)
class CapacitySettings:
    """The capacity law: capacity = N / (|S| + 1), premodulo = capacity^2, clamped and damped."""

    damping: str = "none"
    max_change_factor: float = 10.0
    window: int = 3
    smoothing: float = 0.5
    max_percent: float = 50.0
    min_capacity: float = 1.0
    max_capacity_fraction: float = 1.0

    DOCS: ClassVar[dict[str, str]] = {
        "damping": (
            "How the sum feeding the law is damped: none (this step's S), moving_average "
            "(mean |S| of the last `window` runs), exponential (smoothing over the neuron's "
            "runs) or max_percent (premodulo moves at most `max_percent` % per step)."),
        "max_change_factor": (
            "A neuron's premodulo changes by at most this factor per step (either way); 0 "
            "disables the clamp."),
        "window": (
            "moving_average: runs averaged, this one included (at most cache.keep_last + 1)."),
        "smoothing": (
            "exponential: weight of the newest |S| (alpha)."),
        "max_percent": (
            "max_percent: largest premodulo change per step, in %."),
        "min_capacity": (
            "Lower bound of the capacity."),
        "max_capacity_fraction": (
            "Upper bound of the capacity, in units of N."),
    }

    def check(self, where: str = "hashtron.capacity") -> None:
        """Raise ``ConfigError`` on an out-of-range value."""
        _check_choice(f"{where}.damping", self.damping, DAMPINGS)
        _check_number(f"{where}.max_change_factor", self.max_change_factor, low=0.0)
        if 0 < self.max_change_factor < 1:
            raise _fail(f"{where}.max_change_factor", self.max_change_factor,
                        "0 (no clamp) or a factor >= 1")
        _check_number(f"{where}.window", self.window, low=1, integer=True)
        _check_number(f"{where}.smoothing", self.smoothing, low=0.0, high=1.0, low_open=True)
        _check_number(f"{where}.max_percent", self.max_percent, low=0.0, low_open=True)
        _check_number(f"{where}.min_capacity", self.min_capacity, low=1.0)
        _check_number(f"{where}.max_capacity_fraction", self.max_capacity_fraction, low=0.0,
                      high=1.0, low_open=True)


@dataclass(frozen=True)
class GoldZoneSettings:
    """Margin zones: noise floor eps = noise_scale*sqrt(N), collapse tau = collapse_fraction*N."""

    noise_scale: float = 1.0
    collapse_fraction: float = 0.8
    moderate_low_scale: float = 0.5
    moderate_high_fraction: float = 0.95

    DOCS: ClassVar[dict[str, str]] = {
        "noise_scale": (
            "Noise floor eps = noise_scale * sqrt(N); |S| <= eps is the noisy regime."),
        "collapse_fraction": (
            "Collapse threshold tau = collapse_fraction * N; |S| >= tau is the collapsed "
            "regime."),
        "moderate_low_scale": (
            "Moderate band (second priority) starts above moderate_low_scale * sqrt(N)."),
        "moderate_high_fraction": (
            "Moderate band ends at moderate_high_fraction * N."),
    }

    def check(self, where: str = "hashtron.gold_zone") -> None:
        """Raise ``ConfigError`` on an out-of-range value."""
        _check_number(f"{where}.noise_scale", self.noise_scale, low=0.0)
        _check_number(f"{where}.collapse_fraction", self.collapse_fraction, low=0.0, high=1.0,
                      low_open=True)
        _check_number(f"{where}.moderate_low_scale", self.moderate_low_scale, low=0.0,
                      high=self.noise_scale)
        _check_number(f"{where}.moderate_high_fraction", self.moderate_high_fraction,
                      low=self.collapse_fraction, high=1.0)


@dataclass(frozen=True)
class CacheSettings:
    """Retention of the sum cache and the histogram of margins."""

    keep_last: int = 32
    max_records: int = 1_000_000
    histogram_bins: int = 10

    DOCS: ClassVar[dict[str, str]] = {
        "keep_last": (
            "Records kept per neuron (older ones are pruned): the history the capacity law and "
            "the alerts see, so at least alerts.oscillation_window."),
        "max_records": (
            "Records kept in all (the oldest go first); about 60 bytes each."),
        "histogram_bins": (
            "Bins of the per-layer margin histogram over [0, 1]."),
    }

    def check(self, where: str = "hashtron.cache") -> None:
        """Raise ``ConfigError`` on an out-of-range value."""
        _check_number(f"{where}.keep_last", self.keep_last, low=1, integer=True)
        _check_number(f"{where}.max_records", self.max_records, low=1, integer=True)
        _check_number(f"{where}.histogram_bins", self.histogram_bins, low=1, high=1000,
                      integer=True)


@dataclass(frozen=True)
class AlertSettings:
    """When the pipeline raises an alert (a log line and a metrics event)."""

    train_accuracy: float = 0.95
    stagnation_epochs: int = 3
    stagnation_tolerance: float = 0.001
    oscillation_window: int = 4
    oscillation_ratio: float = 2.0
    stuck_factor: float = 2.0

    DOCS: ClassVar[dict[str, str]] = {
        "train_accuracy": (
            "Memorisation risk: alert when train accuracy rises above this."),
        "stagnation_epochs": (
            "Alert when the mean margin has not changed for more than this many epochs."),
        "stagnation_tolerance": (
            "Mean-margin change below which an epoch counts as stagnant."),
        "oscillation_window": (
            "Premodulo oscillation: the neuron's last this-many premodulos (at most "
            "cache.keep_last) alternate up and down..."),
        "oscillation_ratio": (
            "...each by at least this factor."),
        "stuck_factor": (
            "Stuck in one layer: a layer visit takes more than stuck_factor x its planned "
            "steps (failed attempts pile up)."),
    }

    def check(self, where: str = "hashtron.alerts") -> None:
        """Raise ``ConfigError`` on an out-of-range value."""
        _check_number(f"{where}.train_accuracy", self.train_accuracy, low=0.0, high=1.0)
        _check_number(f"{where}.stagnation_epochs", self.stagnation_epochs, low=1,
                      integer=True)
        _check_number(f"{where}.stagnation_tolerance", self.stagnation_tolerance, low=0.0)
        _check_number(f"{where}.oscillation_window", self.oscillation_window, low=3,
                      integer=True)
        _check_number(f"{where}.oscillation_ratio", self.oscillation_ratio, low=1.0,
                      low_open=True)
        _check_number(f"{where}.stuck_factor", self.stuck_factor, low=1.0)


_SECTIONS = {"task": TaskSettings, "pipeline": PipelineSettings, "capacity": CapacitySettings,
             "gold_zone": GoldZoneSettings, "cache": CacheSettings, "alerts": AlertSettings}


@dataclass(frozen=True)
class HashtronSettings:
    """All hashtron settings; ``layers`` None means the task's default architecture."""

    task: TaskSettings = field(default_factory=TaskSettings)
    layers: tuple | None = field(default=None, metadata={
        "doc": "Network layers, first to last: [{width, premodulo, combiner: {kind, ...}}]; "
               "null: the task's default architecture."})
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    capacity: CapacitySettings = field(default_factory=CapacitySettings)
    gold_zone: GoldZoneSettings = field(default_factory=GoldZoneSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)

    def __post_init__(self) -> None:
        for name in _SECTIONS:
            getattr(self, name).check(f"hashtron.{name}")
        # History queries see at most cache.keep_last records of a neuron, so a longer window
        # would silently shrink to keep_last (the moving average reads window - 1 past runs).
        keep = self.cache.keep_last
        if self.capacity.damping == "moving_average" and self.capacity.window - 1 > keep:
            raise ConfigError(
                f"hashtron.capacity.window: got {self.capacity.window}, but the sum cache keeps "
                f"only hashtron.cache.keep_last = {keep} records per neuron and the moving "
                f"average needs window - 1 past runs; lower the window to at most {keep + 1} "
                "or raise cache.keep_last")
        window = self.alerts.oscillation_window
        if window > keep:
            lower = f"lower it to at most {keep} or " if keep >= 3 else ""
            raise ConfigError(
                f"hashtron.alerts.oscillation_window: got {window}, but the sum cache keeps only "
                f"hashtron.cache.keep_last = {keep} premodulos per neuron, so the alert could "
                f"never fire; {lower}raise cache.keep_last to at least {window}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise _fail("hashtron.layers", self.layers, "a non-empty list of layers or null")
            object.__setattr__(self, "layers", tuple(dict(x) if isinstance(x, dict) else x
                                                     for x in self.layers))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "hashtron") -> HashtronSettings:
        """Validate a plain mapping (as in a config file); missing keys take their defaults."""
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise _fail(where, data, "a mapping")
        unknown = sorted(set(data) - {*_SECTIONS, "layers"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: "
                              f"{sorted([*_SECTIONS, 'layers'])}")
        kwargs: dict[str, Any] = {}
        for name, section_cls in _SECTIONS.items():
            kwargs[name] = _section_from_dict(section_cls, data.get(name), f"{where}.{name}")
        if data.get("layers") is not None:
            kwargs["layers"] = data["layers"]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping that ``from_dict`` accepts."""
        out: dict[str, Any] = {name: dataclasses.asdict(getattr(self, name))
                               for name in _SECTIONS}
        out["layers"] = None if self.layers is None else [dict(x) for x in self.layers]
        return out

    def replace(self, **sections: Any) -> HashtronSettings:
        """A copy with whole sections replaced, or section fields given as dicts merged in."""
        kwargs = {}
        for name, value in sections.items():
            if isinstance(value, dict) and name in _SECTIONS:
                value = dataclasses.replace(getattr(self, name), **value)
            kwargs[name] = value
        return dataclasses.replace(self, **kwargs)


def _section_from_dict(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise _fail(where, data, "a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    section = cls(**data)
    section.check(where)
    return section


def settings_table() -> list[tuple[str, Any, str]]:
    """``(key path, default, meaning)`` of every setting, in declaration order."""
    rows: list[tuple[str, Any, str]] = []
    for top in dataclasses.fields(HashtronSettings):
        if top.name == "layers":
            rows.append(("hashtron.layers", None, top.metadata["doc"]))
            continue
        for f in dataclasses.fields(_SECTIONS[top.name]):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            doc = _SECTIONS[top.name].DOCS[f.name]
            rows.append((f"hashtron.{top.name}.{f.name}", default, doc))
    return rows


# Ready-made variants; the lead can write them out as packaged YAML configs.
TEMPLATES: dict[str, dict[str, Any]] = {
    "backward": {"pipeline": {"direction": "backward"}},
    "forward": {"pipeline": {"direction": "forward"}},
    # gentle: damped, slow premodulo moves, long history; aggressive: the raw law.
    "gentle": {"pipeline": {"direction": "backward"},
               "capacity": {"damping": "moving_average", "window": 3, "max_change_factor": 2.0},
               "cache": {"keep_last": 64}},
    "aggressive": {"pipeline": {"direction": "backward"},
                   "capacity": {"damping": "none", "max_change_factor": 0.0},
                   "gold_zone": {"collapse_fraction": 0.9}, "cache": {"keep_last": 8}},
}


def template(name: str) -> HashtronSettings:
    """The settings of template ``name`` (one of ``TEMPLATES``)."""
    if name not in TEMPLATES:
        raise ConfigError(f"hashtron template {name!r} is unknown; use one of {sorted(TEMPLATES)}")
    return HashtronSettings.from_dict(TEMPLATES[name])


__all__ = ["DAMPINGS", "DIRECTIONS", "TEMPLATES", "VOTES", "AlertSettings", "CacheSettings",
           "CapacitySettings", "GoldZoneSettings", "HashtronSettings", "PipelineSettings",
           "TaskSettings", "settings_table", "template"]
