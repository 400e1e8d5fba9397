"""Alerts: conditions worth a human's attention, as log lines and metrics events.

``AlertMonitor`` checks, with thresholds from ``AlertSettings``:

- ``memorisation``: train accuracy rose above ``train_accuracy`` (raised when it crosses, again
  only after it fell back);
- ``margin_stagnation``: the network's mean margin moved less than ``stagnation_tolerance`` for
  more than ``stagnation_epochs`` epochs in a row (checked at epoch ends);
- ``premodulo_oscillation``: the trained neuron's last ``oscillation_window`` premodulos went
  up and down alternately, each time by at least ``oscillation_ratio``;
- ``stuck_in_layer``: one layer visit has taken more than ``stuck_factor`` times its planned
  steps (failed attempts piling up; raised once per visit).

The pipeline adds ``attempt_failed`` and ``neuron_skipped`` alerts itself. The monitor's state
(what has been raised) is part of the pipeline's state, so a resumed run raises the same alerts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.hashtron.settings import AlertSettings

ALERT_KINDS = ("memorisation", "margin_stagnation", "premodulo_oscillation", "stuck_in_layer",
               "attempt_failed", "neuron_skipped")


@dataclass(frozen=True)
class Alert:
    """One alert: its ``kind``, the pipeline ``step``, a message and JSON-able details."""

    kind: str
    step: int
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A metrics event: ``{"event": "alert", "kind", "step", "message", ...details}``."""
        return {"event": "alert", "kind": self.kind, "step": self.step,
                "message": self.message, **self.data}

    def log_line(self) -> str:
        """One human-readable log line."""
        return f"ALERT {self.kind} at step {self.step}: {self.message}"


def is_oscillating(premodulos: Sequence[int], ratio: float) -> bool:
    """True if consecutive premodulos alternate up/down, every move by a factor >= ``ratio``."""
    if len(premodulos) < 3:
        return False
    moves = [math.log(max(b, 1) / max(a, 1)) for a, b in itertools.pairwise(premodulos)]
    big = all(abs(m) >= math.log(ratio) for m in moves)
    alternating = all((a > 0) != (b > 0) for a, b in itertools.pairwise(moves))
    return big and alternating


class AlertMonitor:
    """Stateful checks run by the pipeline after each step and at each epoch end."""

    def __init__(self, settings: AlertSettings | None = None) -> None:
        self.settings = settings or AlertSettings()
        self.memorising = False
        self.last_mean_margin: float | None = None
        self.stagnant_epochs = 0
        self.stuck_visit = -1  # the visit already reported as stuck

    def check_step(self, *, step: int, train_accuracy: float, layer: int, position: int,
                   recent_premodulos: Sequence[int], visit: int, visit_steps: int,
                   visit_planned: int) -> list[Alert]:
        """Alerts after one step (see the module doc)."""
        s = self.settings
        alerts = []
        if train_accuracy > s.train_accuracy and not self.memorising:
            alerts.append(Alert("memorisation", step,
                                f"train accuracy {train_accuracy:.4f} > {s.train_accuracy}: the "
                                "network may be memorising; consider lower capacity",
                                {"train_accuracy": train_accuracy}))
        self.memorising = train_accuracy > s.train_accuracy
        window = list(recent_premodulos)[-s.oscillation_window:]
        if len(window) == s.oscillation_window and is_oscillating(window, s.oscillation_ratio):
            alerts.append(Alert("premodulo_oscillation", step,
                                f"neuron {layer}.{position} premodulo oscillates: {window}; "
                                "consider damping (capacity.damping) or a smaller "
                                "capacity.max_change_factor",
                                {"neuron": f"{layer}.{position}", "premodulos": window}))
        if visit_steps > s.stuck_factor * visit_planned and self.stuck_visit != visit:
            self.stuck_visit = visit
            alerts.append(Alert("stuck_in_layer", step,
                                f"layer {layer} has taken {visit_steps} steps for "
                                f"{visit_planned} planned neuron trainings",
                                {"layer": layer, "visit_steps": visit_steps,
                                 "planned": visit_planned}))
        return alerts

    def check_epoch(self, *, step: int, epoch: int, mean_margin: float | None) -> list[Alert]:
        """Alerts at the end of ``epoch`` given the network's mean latest margin."""
        if mean_margin is None:
            return []
        alerts = []
        if self.last_mean_margin is not None:
            if abs(mean_margin - self.last_mean_margin) < self.settings.stagnation_tolerance:
                self.stagnant_epochs += 1
            else:
                self.stagnant_epochs = 0
        self.last_mean_margin = mean_margin
        if self.stagnant_epochs > self.settings.stagnation_epochs:
            alerts.append(Alert("margin_stagnation", step,
                                f"mean margin {mean_margin:.4f} has not moved for "
                                f"{self.stagnant_epochs} epochs (epoch {epoch})",
                                {"mean_margin": mean_margin, "epochs": self.stagnant_epochs}))
        return alerts

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state."""
        return {"memorising": self.memorising, "last_mean_margin": self.last_mean_margin,
                "stagnant_epochs": self.stagnant_epochs, "stuck_visit": self.stuck_visit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.memorising = bool(state["memorising"])
        last = state["last_mean_margin"]
        self.last_mean_margin = None if last is None else float(last)
        self.stagnant_epochs = int(state["stagnant_epochs"])
        self.stuck_visit = int(state["stuck_visit"])
