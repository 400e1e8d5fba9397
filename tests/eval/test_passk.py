"""pass@k: the estimator against hand-computed values, and the evaluation loop end to end."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from kiln.errors import ConfigError, KilnError
from kiln.eval.code_problems import CodeProblem, load_problems
from kiln.eval.passk import DEFAULT_KS, evaluate_pass_at_k, pass_at_k
from kiln.eval.sandbox import SandboxLimits

LIMITS = SandboxLimits(timeout_s=5.0, cpu_seconds=1, memory_bytes=256 * 2**20)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        # k = 1 is the plain fraction of correct samples.
        (10, 1, 1, 0.1),
        (10, 3, 1, 0.3),
        (1, 1, 1, 1.0),
        # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 2, 0.7),
        # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 1, 2, 0.5),
        # 1 - C(5,3)/C(6,3) = 1 - 10/20
        (6, 1, 3, 0.5),
        # 1 - C(8,3)/C(10,3) = 1 - 56/120
        (10, 2, 3, 1 - 56 / 120),
        # 1 - C(15,10)/C(20,10) = 1 - 3003/184756
        (20, 5, 10, 1 - 3003 / 184756),
        # n - c < k: every draw of k contains a correct sample
        (5, 3, 3, 1.0),
        (10, 2, 10, 1.0),
        # c = 0: nothing can pass
        (10, 0, 1, 0.0),
        (10, 0, 10, 0.0),
        (1, 0, 1, 0.0),
        # k = n: pass iff at least one sample passed
        (7, 1, 7, 1.0),
        (7, 0, 7, 0.0),
        # c = n
        (3, 3, 2, 1.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_where_binomials_are_huge() -> None:
    for n, c, k in [(200, 100, 100), (1000, 3, 500), (10_000, 1, 1), (500, 250, 10)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-15)


def test_pass_at_k_grows_with_k_and_with_c() -> None:
    by_k = [pass_at_k(20, 4, k) for k in range(1, 21)]
    by_c = [pass_at_k(20, c, 5) for c in range(21)]
    assert by_k == sorted(by_k)
    assert by_c == sorted(by_c)
    assert by_c[0] == 0.0
    assert by_c[-1] == 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)


def test_default_ks_are_one_and_ten() -> None:
    assert DEFAULT_KS == (1, 10)


def test_code_is_not_run_without_opt_in() -> None:
    calls = []

    def complete(problem: CodeProblem, n: int) -> list[str]:
        calls.append(problem.id)
        return [problem.canonical_solution] * n

    with pytest.raises(ConfigError, match=r"eval\.allow_code_execution: true") as caught:
        evaluate_pass_at_k(load_problems()[:1], complete, n=1, ks=(1,))
    assert isinstance(caught.value, KilnError)
    assert calls == []  # refused before any sampling


def _subset() -> list[CodeProblem]:
    by_entry = {problem.entry_point: problem for problem in load_problems()}
    return [by_entry[name] for name in ("fibonacci", "is_palindrome", "chunk")]


def test_reference_solutions_give_one_and_wrong_ones_zero() -> None:
    problems = _subset()

    def right(problem: CodeProblem, n: int) -> list[str]:
        return [problem.canonical_solution] * n

    def wrong(problem: CodeProblem, n: int) -> list[str]:
        return ["    return None\n"] * n

    good = evaluate_pass_at_k(
        problems, right, n=2, ks=(1, 2), limits=LIMITS, allow_code_execution=True
    )
    bad = evaluate_pass_at_k(
        problems, wrong, n=2, ks=(1, 2), limits=LIMITS, allow_code_execution=True
    )
    assert good.pass_at_k == {1: 1.0, 2: 1.0}
    assert bad.pass_at_k == {1: 0.0, 2: 0.0}
    assert [outcome.correct for outcome in good.problems] == [2, 2, 2]
    assert all(outcome.statuses == {"failed": 2} for outcome in bad.problems)
    assert all(outcome.first_failure.startswith("failed: ") for outcome in bad.problems)
    assert good.compile_rate == bad.compile_rate == 1.0


def test_mixed_samples_skipped_k_and_json_report() -> None:
    problem = _subset()[0]

    def complete(p: CodeProblem, n: int) -> list[str]:
        return [p.canonical_solution, "    return -1\n", "    return (\n", p.canonical_solution]

    report = evaluate_pass_at_k(
        [problem], complete, n=4, ks=(10, 2, 1), limits=LIMITS, allow_code_execution=True
    )
    assert report.ks == (1, 2)
    assert report.skipped_ks == (10,)
    assert report.notes == ("pass@10 skipped: it needs n >= 10 samples per problem, n is 4",)
    assert report.pass_at_k[1] == pytest.approx(0.5)
    assert report.pass_at_k[2] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert report.compile_rate == 0.75
    outcome = report.problems[0]
    assert (outcome.correct, outcome.compiled) == (2, 3)
    assert outcome.statuses == {"failed": 1, "passed": 2, "syntax_error": 1}
    data = json.loads(json.dumps(report.to_dict()))
    assert data["pass_at_k"] == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(5 / 6)}
    assert data["problems"][0]["id"] == problem.id
    assert data["limits"]["timeout_s"] == 5.0
    assert "cpu_limit" in data["protections"]
    assert report.metrics() == {
        "pass@1": pytest.approx(0.5),
        "pass@2": pytest.approx(5 / 6),
        "compile_rate": 0.75,
    }


def test_harness_goes_on_after_loops_and_memory_bombs() -> None:
    problems = _subset()
    completions = {
        problems[0].id: "    while True:\n        pass\n",
        problems[1].id: "    hoard = []\n    while True:\n        hoard.append(bytearray(2**24))\n",
        problems[2].id: problems[2].canonical_solution,
    }
    limits = SandboxLimits(timeout_s=3.0, cpu_seconds=1, memory_bytes=256 * 2**20)
    report = evaluate_pass_at_k(
        problems,
        lambda p, n: [completions[p.id]] * n,
        n=1,
        ks=(1,),
        limits=limits,
        allow_code_execution=True,
    )
    loop, bomb, fine = report.problems
    assert set(loop.statuses) <= {"cpu_limit", "timeout"}
    assert bomb.statuses == {"memory_limit": 1}
    assert fine.statuses == {"passed": 1}
    assert report.pass_at_k[1] == pytest.approx(1 / 3)


def test_an_empty_body_does_not_count_as_compiled() -> None:
    # Every prompt ends with its docstring, which compiles on its own.
    report = evaluate_pass_at_k(
        _subset()[:1], lambda p, n: ["", "    # todo\n"], n=2, ks=(1,), limits=LIMITS,
        allow_code_execution=True,
    )
    assert report.compile_rate == 0.0 and report.pass_at_k[1] == 0.0


def test_bad_arguments_are_reported() -> None:
    problems = _subset()[:1]

    def complete(p: CodeProblem, n: int) -> list[str]:
        return [p.canonical_solution]

    with pytest.raises(ConfigError, match="n >= 1"):
        evaluate_pass_at_k(problems, complete, n=0, allow_code_execution=True)
    with pytest.raises(ConfigError, match="raise n"):
        evaluate_pass_at_k(problems, complete, n=2, ks=(5, 10), allow_code_execution=True)
    with pytest.raises(ConfigError, match="at least one problem"):
        evaluate_pass_at_k([], complete, n=1, ks=(1,), allow_code_execution=True)
    with pytest.raises(ValueError, match="must return 3 strings"):
        evaluate_pass_at_k(
            problems, complete, n=3, ks=(1,), limits=LIMITS, allow_code_execution=True
        )
