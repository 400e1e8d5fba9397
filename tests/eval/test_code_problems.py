"""The packaged problem set and the loader's validation of problem files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.errors import DataError
from kiln.eval.code_problems import (
    FIELDS,
    CodeProblem,
    load_problems,
    parse_problems,
)
from kiln.eval.compile_check import compiles
from kiln.eval.sandbox import SandboxLimits, run_candidate

LIMITS = SandboxLimits(timeout_s=10.0, cpu_seconds=5)

GOOD = {
    "id": "t/1",
    "prompt": 'def double(x):\n    """Twice x."""\n',
    "entry_point": "double",
    "canonical_solution": "    return 2 * x\n",
    "tests": "assert double(3) == 6\n",
}


def write_lines(path: Path, *records: object) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_packaged_set_is_large_varied_and_well_formed() -> None:
    problems = load_problems()
    assert len(problems) >= 40
    assert len({p.id for p in problems}) == len(problems)
    assert len({p.entry_point for p in problems}) == len(problems)
    for problem in problems:
        assert problem.prompt.rstrip().endswith('"""'), problem.id  # ends with its docstring
        assert compiles(problem.prompt + problem.canonical_solution), problem.id
        assert problem.tests.count("assert") >= 3, problem.id
        assert problem.entry_point in problem.tests, problem.id


def test_every_reference_solution_passes_and_every_stub_fails() -> None:
    failures = []
    for problem in load_problems():
        reference = run_candidate(problem, problem.canonical_solution, LIMITS)
        if not reference.passed:
            failures.append(f"{problem.id} reference: {reference.status}: {reference.reason}")
        # An empty body must fail, or the tests would not test anything.
        stub = run_candidate(problem, "    pass\n", LIMITS)
        if stub.passed:
            failures.append(f"{problem.id}: a body of `pass` passes the tests")
    assert failures == []


def test_load_problems_reads_a_file_and_skips_blank_lines(tmp_path: Path) -> None:
    second = {**GOOD, "id": "t/2"}
    path = write_lines(tmp_path / "p.jsonl", GOOD, "", "   ", second)
    problems = load_problems(path)
    assert problems == [CodeProblem(**GOOD), CodeProblem(**second)]
    assert load_problems(str(path)) == problems


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ((GOOD, "{not json"), r"line 2: not valid JSON"),
        (("[1, 2]",), r"line 1: expected a JSON object with id, .*, got list"),
        (({k: v for k, v in GOOD.items() if k != "tests"},), r"line 1: field 'tests' is missing"),
        (({**GOOD, "prompt": 42},), r"line 1: field 'prompt' must be a non-empty string"),
        (
            ({**GOOD, "canonical_solution": "  "},),
            r"field 'canonical_solution' must be a non-empty",
        ),
        (({**GOOD, "difficulty": "easy"},), r"line 1: field 'difficulty' is not known"),
        (
            ({**GOOD, "entry_point": "not a name"},),
            r"field 'entry_point' must be a Python function",
        ),
        (({**GOOD, "entry_point": "triple"},), r"field 'prompt' must define the entry point"),
        ((GOOD, GOOD), r"line 2: field 'id': duplicate id 't/1' \(first used at .*, line 1\)"),
        (
            ({**GOOD, "canonical_solution": "return 2 * x\n"},),
            r"line 1: field 'canonical_solution' does not compile",
        ),
        (({**GOOD, "tests": "assert double(3) ==\n"},), r"line 1: field 'tests' does not compile"),
        (("", "  "), r"no code problems found"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path: Path, records: tuple, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", *records)
    with pytest.raises(DataError, match=message) as caught:
        load_problems(path)
    assert str(path) in str(caught.value)


def test_missing_and_undecodable_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read code problems file .*missing\.jsonl"):
        load_problems(tmp_path / "missing.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_problems(binary)


def test_parse_problems_keeps_unicode_line_separators_inside_strings() -> None:
    record = {**GOOD, "tests": "assert double(1) == 2  # \u2028 fine\n"}
    text = json.dumps(record, ensure_ascii=False)
    assert parse_problems(text)[0].tests == record["tests"]
    assert set(FIELDS) == set(GOOD)
