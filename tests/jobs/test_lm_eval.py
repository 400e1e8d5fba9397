"""The evaluation time budget: generation suites yield to training, the final run does not."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.config import load_config
from kiln.jobs import lm_eval
from kiln.jobs.lm_eval import LMEvaluator
from kiln.jobs.lm_sampling import Completion


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def evaluator(monkeypatch: pytest.MonkeyPatch, costs: dict[str, float]) -> tuple[LMEvaluator,
                                                                                  Clock, list]:
    clock = Clock()
    monkeypatch.setattr(lm_eval.time, "monotonic", clock)
    config = load_config("smoke", ["eval.max_time_fraction=0.15"])
    ev = LMEvaluator(config, None, [], None, 1, None)  # type: ignore[arg-type]
    ran: list[str] = []

    def suite(name: str) -> Any:
        def run(_model: object) -> dict[str, float]:
            ran.append(name)
            clock.now += costs[name]
            return {name: 1.0}
        return run

    for name in costs:
        monkeypatch.setattr(ev, f"_{name}", suite(name))
    return ev, clock, ran


def test_generation_suites_are_skipped_when_over_the_time_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ev, clock, ran = evaluator(monkeypatch, {"ppl": 1.0, "compile": 10.0})
    clock.now = 100.0  # training time before the first evaluation
    assert "skipped_suites" not in ev.run(None, ["ppl", "compile"], budgeted=True)  # type: ignore[arg-type]
    assert ran == ["ppl", "compile"]  # the first run measures the cost

    clock.now += 10.0  # 12 s of 122 s spent evaluating; another compile: 22 s > 15% of 122
    result = ev.run(None, ["ppl", "compile"], budgeted=True)  # type: ignore[arg-type]
    assert result["skipped_suites"] == ["compile"] and ran[-1] == "ppl"

    clock.now += 100.0  # enough training since: 13 + 10 s <= 15% of 223 s
    assert "skipped_suites" not in ev.run(None, ["ppl", "compile"], budgeted=True)  # type: ignore[arg-type]


def test_the_final_evaluation_runs_every_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    ev, clock, ran = evaluator(monkeypatch, {"ppl": 1.0, "compile": 50.0})
    clock.now = 10.0
    ev.run(None, ["ppl", "compile"], budgeted=True)  # type: ignore[arg-type]
    ev.run(None, ["ppl", "compile"], budgeted=False)  # type: ignore[arg-type]
    assert ran == ["ppl", "compile", "ppl", "compile"]


@pytest.mark.parametrize(("completion", "rate"), [("", 0.0), ("    return 2 * x\n", 1.0)])
def test_a_model_that_writes_no_body_scores_zero_compile_rate(
    monkeypatch: pytest.MonkeyPatch, completion: str, rate: float
) -> None:
    # A prompt with a docstring compiles by itself; only a written body may count.
    ev = LMEvaluator(load_config("smoke"), None, [], None, 1, None)  # type: ignore[arg-type]
    ev._prompts = ['def f(x):\n    """Double x."""\n']
    monkeypatch.setattr(
        lm_eval, "complete_texts", lambda *_a, **_k: [Completion(completion, finished=True)]
    )
    assert ev._compile(None)["compile_rate"] == rate  # type: ignore[arg-type]


def test_no_function_prompts_give_no_compile_rate() -> None:
    # Zero samples are no evidence that nothing compiles: the rate is left out, with a note.
    ev = LMEvaluator(load_config("smoke"), None, [], None, 1, None)  # type: ignore[arg-type]
    ev._prompts = []
    result = ev._compile(None)  # type: ignore[arg-type]
    assert "compile_rate" not in result
    assert result["compile_samples"] == 0 and "eval.compile.scan_tokens" in result["compile_note"]
