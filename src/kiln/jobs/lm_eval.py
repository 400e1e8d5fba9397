"""The code LM's evaluation suites: perplexity, compile rate and pass@k, within a time budget.

During training, perplexity runs at every evaluation; a generation suite (compile, passk) runs
only if the time spent evaluating so far plus what that suite cost last time stays within
``eval.max_time_fraction`` of the wall time since training (re)started. The first run of a suite
measures its cost. The final evaluation runs every configured suite.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.config import Config
from kiln.data.loader import Stream
from kiln.data.tokenizer import KilnTokenizer
from kiln.errors import KilnError
from kiln.eval.code_problems import CodeProblem, load_problems
from kiln.eval.function_completion import body_compiles, function_prompts, function_sample
from kiln.eval.passk import evaluate_pass_at_k
from kiln.eval.perplexity import evaluate_perplexity
from kiln.eval.sandbox import SandboxLimits
from kiln.jobs.lm_sampling import complete_texts
from kiln.models.gpt import GPT

GENERATION_SUITES = ("compile", "passk")

# Samples kept in eval/<step>.json so a reader can see what was judged.
_EXAMPLES_KEPT = 3


def require_code_execution_opt_in(config: Config, suites: Sequence[str]) -> None:
    """Refuse the passk suite unless the config opts in to running model-written code.

    Called before any data or sampling, so that the refusal comes at once.
    """
    if "passk" in suites and not config.eval.allow_code_execution:
        raise KilnError(
            "the passk suite runs model-generated code; opt in with "
            "`kiln eval RUN_DIR --suite passk --allow-code-execution`, or with "
            "eval.allow_code_execution: true in the config"
        )


class LMEvaluator:
    """Runs the suites on a model; remembers each suite's cost for the time budget."""

    def __init__(
        self,
        config: Config,
        tokenizer: KilnTokenizer,
        val_windows: list[dict[str, np.ndarray]],
        val_stream: Stream,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.val_windows = val_windows
        self.val_stream = val_stream
        self.batch_size = batch_size
        self.device = device
        self._started = time.monotonic()
        self._spent = 0.0
        self._cost: dict[str, float] = {}
        self._prompts: list[str] | None = None
        self._problems: list[CodeProblem] | None = None

    def run(self, model: nn.Module, suites: Sequence[str], *, budgeted: bool) -> dict[str, Any]:
        """Metrics of the requested suites; generation suites over budget are listed as skipped."""
        metrics: dict[str, Any] = {}
        skipped = []
        for suite in suites:
            if budgeted and suite in GENERATION_SUITES and self._over_budget(suite):
                skipped.append(suite)
                continue
            began = time.monotonic()
            metrics |= getattr(self, f"_{suite}")(model)
            self._cost[suite] = time.monotonic() - began
            self._spent += self._cost[suite]
        if skipped:
            metrics["skipped_suites"] = skipped
        return metrics

    def _over_budget(self, suite: str) -> bool:
        elapsed = time.monotonic() - self._started
        expected = self._spent + self._cost.get(suite, 0.0)
        return suite in self._cost and expected > self.config.eval.max_time_fraction * elapsed

    # ------------------------------------------------------------------ suites

    def _ppl(self, model: nn.Module) -> dict[str, Any]:
        return evaluate_perplexity(model, self.val_windows, self.batch_size, self.device)

    def _compile(self, model: GPT) -> dict[str, Any]:
        c = self.config.eval.compile
        if self._prompts is None:
            self._prompts = function_prompts(self._val_documents(), c.prompts, self.config.seed)
        samples = []
        for index, prompt in enumerate(self._prompts):
            (completion,) = complete_texts(
                model, self.tokenizer, prompt, 1, max_new_tokens=c.max_new_tokens,
                temperature=c.temperature, top_k=c.top_k, seed=self.config.seed + index,
            )
            samples.append(function_sample(prompt, completion.text, finished=completion.finished))
        passed = [
            body_compiles(prompt, sample)
            for prompt, sample in zip(self._prompts, samples, strict=True)
        ]
        if not samples:  # a rate of 0 would read as "nothing compiles": report no rate
            return {
                "compile_samples": 0,
                "compile_note": f"no function signature in the first {c.scan_tokens} val tokens; "
                "raise eval.compile.scan_tokens or data.val_fraction",
            }
        return {
            "compile_rate": float(np.mean(passed)),
            "compile_samples": len(samples),
            "compile_examples": [
                {"sample": s, "compiles": ok}
                for s, ok in zip(samples[:_EXAMPLES_KEPT], passed, strict=False)
            ],
        }

    def _passk(self, model: GPT) -> dict[str, Any]:
        p = self.config.eval.passk
        if self._problems is None:
            problems = load_problems(None if p.problems == "packaged" else p.problems)
            self._problems = problems[: p.max_problems]
        index = {problem.id: i for i, problem in enumerate(self._problems)}

        def complete(problem: CodeProblem, n: int) -> list[str]:
            completions = complete_texts(
                model, self.tokenizer, problem.prompt, n, max_new_tokens=p.max_new_tokens,
                temperature=p.temperature, top_k=p.top_k,
                seed=self.config.seed + index[problem.id],
            )
            return [
                function_sample(problem.prompt, c.text, finished=c.finished)[len(problem.prompt) :]
                for c in completions
            ]

        report = evaluate_pass_at_k(
            self._problems,
            complete,
            n=p.n,
            ks=p.ks,
            limits=SandboxLimits(
                timeout_s=p.timeout_s, cpu_seconds=p.cpu_seconds, memory_bytes=p.memory_mb << 20
            ),
            allow_code_execution=self.config.eval.allow_code_execution,
        )
        return {**{f"pass@{k}": v for k, v in report.pass_at_k.items()}, "passk": report.to_dict()}

    def _val_documents(self) -> list[str]:
        """Documents at the start of the validation split (the last one may be cut)."""
        budget = min(len(self.val_stream), self.config.eval.compile.scan_tokens)
        tokens = self.val_stream.read(0, budget)
        ends = np.flatnonzero(tokens == self.tokenizer.eot_id)
        pieces = np.split(tokens, ends)
        return [self.tokenizer.decode(p[p != self.tokenizer.eot_id].tolist()) for p in pieces]
