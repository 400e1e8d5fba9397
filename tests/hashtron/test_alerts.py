"""Alerts: memorisation, margin stagnation, premodulo oscillation, stuck in one layer."""

from __future__ import annotations

from kiln.hashtron.alerts import AlertMonitor, is_oscillating
from kiln.hashtron.settings import AlertSettings


def _step(mon: AlertMonitor, acc: float = 0.5, premodulos=(), visit: int = 0,
          visit_steps: int = 1, planned: int = 4):
    return mon.check_step(step=1, train_accuracy=acc, layer=1, position=2,
                          recent_premodulos=list(premodulos), visit=visit,
                          visit_steps=visit_steps, visit_planned=planned)


def test_memorisation_is_raised_when_crossing() -> None:
    mon = AlertMonitor()
    assert _step(mon, 0.95) == []  # not above 0.95
    kinds = [[a.kind for a in _step(mon, acc)] for acc in (0.96, 0.99, 0.5, 0.97)]
    assert kinds == [["memorisation"], [], [], ["memorisation"]]
    alert = _step(AlertMonitor(AlertSettings(train_accuracy=0.6)), 0.7)[0]
    assert alert.to_dict()["event"] == "alert" and alert.to_dict()["train_accuracy"] == 0.7
    assert alert.log_line().startswith("ALERT memorisation at step 1")


def test_stagnation_after_more_than_k_epochs() -> None:
    mon = AlertMonitor(AlertSettings(stagnation_epochs=3, stagnation_tolerance=0.01))
    out = [mon.check_epoch(step=e, epoch=e, mean_margin=0.3 + 0.001 * e) for e in range(6)]
    assert [len(a) for a in out] == [0, 0, 0, 0, 1, 1]  # 4th unchanged epoch is "more than 3"
    assert mon.check_epoch(step=9, epoch=6, mean_margin=0.9) == []  # it moved: reset
    assert mon.check_epoch(step=9, epoch=7, mean_margin=None) == []


def test_oscillation() -> None:
    assert is_oscillating([100, 1000, 90, 900], 2.0)
    assert not is_oscillating([100, 1000, 900, 90], 2.0)  # not alternating
    assert not is_oscillating([100, 150, 100, 150], 2.0)  # moves too small
    assert not is_oscillating([100, 1000], 2.0)
    mon = AlertMonitor()
    assert [a.kind for a in _step(mon, premodulos=[5, 100, 1000, 90, 900])] == [
        "premodulo_oscillation"]
    assert _step(mon, premodulos=[100, 1000, 90]) == []  # shorter than the window


def test_stuck_once_per_visit() -> None:
    mon = AlertMonitor(AlertSettings(stuck_factor=2.0))
    assert _step(mon, visit_steps=8, planned=4) == []
    assert [a.kind for a in _step(mon, visit_steps=9, planned=4)] == ["stuck_in_layer"]
    assert _step(mon, visit_steps=10, planned=4) == []
    assert [a.kind for a in _step(mon, visit=1, visit_steps=9, planned=4)] == ["stuck_in_layer"]


def test_state_round_trip() -> None:
    mon = AlertMonitor()
    _step(mon, 0.99)
    mon.check_epoch(step=1, epoch=0, mean_margin=0.25)
    other = AlertMonitor()
    other.load_state_dict(mon.state_dict())
    assert other.state_dict() == mon.state_dict()
    assert _step(other, 0.99) == []  # it remembers the alert was raised
