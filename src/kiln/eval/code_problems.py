"""Function-completion problems for pass@k, and the loader of their JSON Lines file.

Each line of the file is one JSON object with five string fields:

- ``id``: unique name, e.g. ``kiln/007``
- ``prompt``: imports, signature and docstring; what the model sees and continues
- ``entry_point``: the name of the function the prompt defines
- ``canonical_solution``: a reference body that completes the prompt
- ``tests``: top-level code with ``assert`` statements that call the entry point

Kiln ships its own set (``problems/problems.jsonl`` in this package); ``load_problems(path)`` reads
any file of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kiln.data.jsonl import read_utf8, string_records
from kiln.errors import DataError
from kiln.eval.compile_check import compiles

FIELDS = ("id", "prompt", "entry_point", "canonical_solution", "tests")
PACKAGED_PROBLEMS = "problems/problems.jsonl"


@dataclass(frozen=True)
class CodeProblem:
    """One function to complete and the tests that judge a completion."""

    id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    tests: str


def load_problems(path: str | Path | None = None) -> list[CodeProblem]:
    """Read and validate a problems file; ``None`` loads the set shipped with Kiln.

    Raises DataError naming the file, the line and the field of the first bad record.
    """
    if path is None:
        resource = resources.files("kiln.eval").joinpath(*PACKAGED_PROBLEMS.split("/"))
        label = str(resource)
        try:
            text = resource.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(
                f"cannot read Kiln's packaged code problems at {label}: {exc}; "
                "reinstall Kiln (pip install -e .) so the package data is present"
            ) from exc
    else:
        label = str(path)
        text = read_utf8(
            Path(path), "code problems file", "check eval.passk.problems ('packaged': Kiln's set)"
        )
    return parse_problems(text, label)


def parse_problems(text: str, label: str = "<problems>") -> list[CodeProblem]:
    """Parse JSON Lines ``text`` into problems; ``label`` names the source in error messages."""
    problems: list[CodeProblem] = []
    first_line_of: dict[str, str] = {}
    for where, record in string_records(text, label, FIELDS):
        problem = _checked_problem(record, where)
        if problem.id in first_line_of:
            raise DataError(
                f"{where}: field 'id': duplicate id {problem.id!r} "
                f"(first used at {first_line_of[problem.id]}); give every problem its own id"
            )
        first_line_of[problem.id] = where
        problems.append(problem)
    if not problems:
        raise DataError(f"{label}: no code problems found; the file needs one JSON object a line")
    return problems


def _checked_problem(record: dict[str, str], where: str) -> CodeProblem:
    entry_point = record["entry_point"]
    if not entry_point.isidentifier():
        raise DataError(
            f"{where}: field 'entry_point' must be a Python function name, got {entry_point!r}"
        )
    if f"def {entry_point}(" not in record["prompt"]:
        raise DataError(
            f"{where}: field 'prompt' must define the entry point (it has no 'def {entry_point}(')"
        )
    # Tests that do not compile would fail every candidate and score any model 0, unreported.
    solution = record["canonical_solution"].rstrip("\n") + "\n"
    if not compiles(record["prompt"] + solution):
        raise DataError(
            f"{where}: field 'canonical_solution' does not compile as the body of the prompt's "
            "function; fix its syntax or indentation"
        )
    if not compiles(record["prompt"] + solution + "\n\n" + record["tests"]):
        raise DataError(
            f"{where}: field 'tests' does not compile after the prompt and the reference "
            "solution, so every candidate would fail; fix its syntax"
        )
    return CodeProblem(**record)
