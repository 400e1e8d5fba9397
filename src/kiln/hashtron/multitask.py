"""Building a pipeline from settings, and training several tasks one after another.

``build_pipeline(settings, seed)`` is what a ``job: hashtron`` run does first: load the task,
shape a random network (``settings.layers`` or the task's default) and wrap both in a
``HashtronPipeline``. ``train_tasks`` trains a list of tasks with the same settings, one after
another, and reports each (the spec's "every language trains successfully"): a task that fails
with a ``KilnError`` is reported as failed and the others still run. Tasks given by name get
their default options, so ``check_tasks`` refuses, before any trains, task options and the
tasks that need data files (``kiln train`` trains those, one at a time).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.errors import ConfigError, KilnError
from kiln.hashtron.pipeline import HashtronPipeline, StepReport
from kiln.hashtron.settings import HashtronSettings, TaskSettings
from kiln.hashtron.tasks import FILE_TASKS, TASK_OPTIONS, Task, build_network, load_task

# The tasks that need no data files and nothing beyond Kiln's own dependencies (digits needs
# the optional extra kiln-train[digits]).
DEFAULT_TASKS = ("isalnum", "isdigit", "isupper", "ispunct", "isxdigit", "isspace",
                 "squareroot", "majority")


def build_pipeline(settings: HashtronSettings, seed: int, run_id: str = "",
                   task: Task | None = None) -> tuple[HashtronPipeline, Task]:
    """The task (loaded unless given) and a pipeline over a fresh random network.

    The network and the pipeline draw from separate streams of ``seed``, so changing the
    pipeline's direction does not change the initial network.
    """
    task = task or load_task(settings.task)
    layers = settings.layers if settings.layers is not None else task.layers
    network = build_network(list(layers), [seed, 0], task.label_bits,
                            task.train.features.shape[1])
    eval_xy = None if task.eval is None else (task.eval.features, task.eval.labels)
    pipeline = HashtronPipeline(network, (task.train.features, task.train.labels), eval_xy,
                                settings, seed=[seed, 1], run_id=run_id)
    return pipeline, task


@dataclass
class TaskReport:
    """How one task went."""

    task: str
    ok: bool
    error: str | None
    train_samples: int
    eval_samples: int
    steps: int
    train_accuracy: float | None
    eval_accuracy: float | None
    eval_majority_baseline: float | None
    generalisation_gap: float | None  # train - eval accuracy
    premodulo_margin_r2: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return dataclasses.asdict(self)


def train_task(settings: HashtronSettings, seed: int, run_id: str = "",
               on_step: Callable[[StepReport], None] | None = None) -> TaskReport:
    """Train ``settings.task`` to the end; a ``KilnError`` becomes a failed report."""
    start = time.perf_counter()
    name = settings.task.name
    try:
        pipeline, task = build_pipeline(settings, seed, run_id)
        while not pipeline.done:
            report = pipeline.step()
            if on_step is not None:
                on_step(report)
    except KilnError as exc:
        return TaskReport(name, False, str(exc), 0, 0, 0, None, None, None, None, None,
                          time.perf_counter() - start)
    acc = pipeline.evaluate()
    train_acc, eval_acc = acc["train_accuracy"], acc["eval_accuracy"]
    r2 = pipeline.premodulo_margin_r2()
    return TaskReport(
        name, True, None, len(task.train), 0 if task.eval is None else len(task.eval),
        pipeline.step_count, train_acc, eval_acc, task.majority_baseline("eval"),
        None if eval_acc is None or train_acc is None else train_acc - eval_acc,
        None if np.isnan(r2) else r2, time.perf_counter() - start)


def check_tasks(tasks: Sequence[str | TaskSettings], settings: HashtronSettings) -> None:
    """Raise ``ConfigError`` if a task given by name is unknown or needs a data file, or if
    ``settings.task.options`` are set: tasks given by name get their default options."""
    names = [task for task in tasks if isinstance(task, str)]
    unknown = [name for name in names if name not in TASK_OPTIONS]
    if unknown:
        raise ConfigError(f"unknown hashtron task(s) {', '.join(unknown)}; the tasks are: "
                          f"{', '.join(TASK_OPTIONS)}")
    files = [name for name in names if name in FILE_TASKS]
    if files:
        commands = "; ".join(
            f"kiln train --config hashtron --set hashtron.task.name={name}"
            + "".join(f" --set hashtron.task.options.{key}={key.upper()}"
                      for key, option in TASK_OPTIONS[name].items() if option.needs)
            for name in files)
        need = "needs a data file" if len(files) == 1 else "need data files"
        raise ConfigError(f"--tasks: {', '.join(files)} {need}, which kiln "
                          "hashtron-tasks cannot be given (every task gets its default "
                          f"options); leave them out and train each alone: {commands}")
    if names and settings.task.options:
        raise ConfigError(
            "hashtron.task.options: kiln hashtron-tasks trains every task with its default "
            f"options, so it takes none (got {dict(settings.task.options)}); drop them, or "
            "train the task alone: kiln train --config hashtron --set hashtron.task.name=NAME "
            "--set hashtron.task.options.KEY=VALUE")


def train_tasks(tasks: Sequence[str | TaskSettings] = DEFAULT_TASKS,
                settings: HashtronSettings | None = None, seed: int = 0,
                run_id: str = "",
                on_task: Callable[[TaskReport], None] | None = None) -> list[TaskReport]:
    """Train each task in turn with ``settings`` (its ``task`` section replaced: a name gets
    the task's default options); returns one report per task, in order. ``on_task`` is called
    after each (e.g. to log it). ``check_tasks`` runs first."""
    settings = settings or HashtronSettings()
    check_tasks(tasks, settings)
    reports = []
    for task in tasks:
        task_settings = task if isinstance(task, TaskSettings) else dataclasses.replace(
            settings.task, name=task, options={})
        report = train_task(dataclasses.replace(settings, task=task_settings), seed,
                            f"{run_id}/{task_settings.name}" if run_id else task_settings.name)
        reports.append(report)
        if on_task is not None:
            on_task(report)
    return reports


def format_reports(reports: Sequence[TaskReport]) -> str:
    """A markdown table of task reports."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = ["| task | ok | train | eval | eval baseline | gap | steps | R^2 | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        r2 = "-" if r.premodulo_margin_r2 is None else f"{r.premodulo_margin_r2:.3f}"
        lines.append(f"| {r.task} | {'yes' if r.ok else 'NO: ' + str(r.error)} | "
                     f"{pct(r.train_accuracy)} | {pct(r.eval_accuracy)} | "
                     f"{pct(r.eval_majority_baseline)} | {pct(r.generalisation_gap)} | "
                     f"{r.steps} | {r2} | {r.seconds:.2f} |")
    return "\n".join(lines)
