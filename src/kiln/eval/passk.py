"""pass@k: the chance that at least one of k sampled completions passes a problem's tests.

For each problem the caller's model writes ``n`` completions; ``c`` of them pass in the sandbox.
The unbiased estimate of pass@k from those n samples (Chen et al., 2021) is

    pass@k = 1 - C(n - c, k) / C(n, k)

averaged over problems. Drawing n > k samples and using this estimate has much lower variance than
drawing exactly k. Running the completions executes model-written code, so the evaluation refuses
to start unless the user opted in.
"""

from __future__ import annotations

import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kiln.errors import ConfigError
from kiln.eval.code_problems import CodeProblem
from kiln.eval.function_completion import body_compiles
from kiln.eval.sandbox import SandboxLimits, check_sandbox, run_candidate

DEFAULT_KS = (1, 10)

OPT_IN_MESSAGE = (
    "pass@k runs code written by the model on this machine, and code execution is off; "
    "set eval.allow_code_execution: true in the config (or --set eval.allow_code_execution=true) "
    "to opt in. The sandbox limits time, memory and output and, where the OS allows, network and "
    "filesystem writes, but it is not a security boundary (see the README)."
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from ``n`` samples of which ``c`` passed (needs 1 <= k <= n)."""
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got {n=}, {c=}, {k=}")
    if n - c < k:
        return 1.0  # every draw of k samples includes at least one correct one
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1..n} (1 - k/i): a product of c factors in (0, 1], with
    # no huge binomial coefficients and no cancellation between nearly equal numbers.
    all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        all_fail *= 1.0 - k / i
    return 1.0 - all_fail


@dataclass(frozen=True)
class ProblemOutcome:
    """One problem's samples: how many passed, how many compiled, and why the others failed."""

    problem_id: str
    n: int
    correct: int
    compiled: int
    pass_at_k: dict[int, float]
    statuses: dict[str, int]  # how many samples ended in each sandbox status
    first_failure: str | None  # the reason of the first failing sample, for a quick look


@dataclass(frozen=True)
class PassAtKReport:
    """Mean pass@k over problems, with the per-problem detail behind it."""

    n: int
    ks: tuple[int, ...]
    pass_at_k: dict[int, float]
    compile_rate: float  # share of prompt + completion programs with a body that compile
    problems: tuple[ProblemOutcome, ...]
    skipped_ks: tuple[int, ...]
    notes: tuple[str, ...]
    protections: tuple[str, ...]  # sandbox protections that were active
    limits: SandboxLimits
    duration_s: float

    def metrics(self) -> dict[str, float]:
        """Flat scalars for a metrics log: ``pass@1``, ``pass@10``, ..., ``compile_rate``."""
        flat = {f"pass@{k}": value for k, value in self.pass_at_k.items()}
        flat["compile_rate"] = self.compile_rate
        return flat

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (string keys, lists, plain numbers)."""
        return {
            "n": self.n,
            "ks": list(self.ks),
            "pass_at_k": {f"pass@{k}": value for k, value in self.pass_at_k.items()},
            "compile_rate": self.compile_rate,
            "num_problems": len(self.problems),
            "skipped_ks": list(self.skipped_ks),
            "notes": list(self.notes),
            "protections": list(self.protections),
            "limits": asdict(self.limits),
            "duration_s": self.duration_s,
            "problems": [
                {
                    "id": outcome.problem_id,
                    "n": outcome.n,
                    "correct": outcome.correct,
                    "compiled": outcome.compiled,
                    "pass_at_k": {f"pass@{k}": v for k, v in outcome.pass_at_k.items()},
                    "statuses": dict(outcome.statuses),
                    "first_failure": outcome.first_failure,
                }
                for outcome in self.problems
            ],
        }


def evaluate_pass_at_k(
    problems: Iterable[CodeProblem],
    complete: Callable[[CodeProblem, int], Sequence[str]],
    *,
    n: int = 10,
    ks: Sequence[int] = DEFAULT_KS,
    limits: SandboxLimits | None = None,
    allow_code_execution: bool = False,
) -> PassAtKReport:
    """Sample ``n`` completions per problem with ``complete(problem, n)``, run each, report pass@k.

    ``complete`` returns the text that follows ``problem.prompt`` (the function body), already
    cut at a stop sequence. Values of k larger than n are skipped with a note. Raises ConfigError
    when ``allow_code_execution`` is False (before any model call), SandboxError when the sandbox
    cannot run here.
    """
    if not allow_code_execution:
        raise ConfigError(OPT_IN_MESSAGE)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"pass@k needs n >= 1 samples per problem, got n={n!r}")
    requested = sorted({operator.index(k) for k in ks})
    if not requested or requested[0] < 1:
        raise ConfigError(f"pass@k needs at least one k, all >= 1; got ks={list(ks)!r}")
    used = tuple(k for k in requested if k <= n)
    skipped = tuple(k for k in requested if k > n)
    if not used:
        raise ConfigError(
            f"no k in {requested} can be estimated from n={n} samples per problem; raise n to at "
            f"least {requested[0]}"
        )
    notes = tuple(
        f"pass@{k} skipped: it needs n >= {k} samples per problem, n is {n}" for k in skipped
    )
    problems = list(problems)
    if not problems:
        raise ConfigError("pass@k needs at least one problem")
    limits = limits or SandboxLimits()
    protections = check_sandbox(limits)  # fails fast, before any sampling, if nothing can run

    start = time.monotonic()
    outcomes = []
    total_samples = total_compiled = 0
    for problem in problems:
        completions = list(complete(problem, n))
        if len(completions) != n or not all(isinstance(text, str) for text in completions):
            raise ValueError(
                f"complete() must return {n} strings for problem {problem.id}, "
                f"got {len(completions)} items"
            )
        statuses: Counter[str] = Counter()
        correct = compiled = 0
        first_failure = None
        for completion in completions:
            program = problem.prompt + completion  # a docstring alone compiles: need a body
            compiled += body_compiles(problem.prompt, program)
            result = run_candidate(problem, completion, limits)
            statuses[result.status] += 1
            correct += result.passed
            if not result.passed and first_failure is None:
                first_failure = f"{result.status}: {result.reason}"
        total_samples += n
        total_compiled += compiled
        outcomes.append(
            ProblemOutcome(
                problem_id=problem.id,
                n=n,
                correct=correct,
                compiled=compiled,
                pass_at_k={k: pass_at_k(n, correct, k) for k in used},
                statuses=dict(sorted(statuses.items())),
                first_failure=first_failure,
            )
        )
    mean = {k: sum(o.pass_at_k[k] for o in outcomes) / len(outcomes) for k in used}
    return PassAtKReport(
        n=n,
        ks=used,
        pass_at_k=mean,
        compile_rate=total_compiled / total_samples,
        problems=tuple(outcomes),
        skipped_ks=skipped,
        notes=notes,
        protections=protections,
        limits=limits,
        duration_s=round(time.monotonic() - start, 3),
    )
