"""Hashtron pipelines: backward (the spec's) against forward (the reference's order), side by side.

For each task (with a seeded train/eval split) and each seed, both pipelines train the same
initial network with default settings (``--epochs`` epochs; backward does its phase-0 bootstrap
on top) and we record train and eval accuracy, the generalisation gap (train - eval), the steps
and the wall time of the training steps alone (data loading and network building are outside
the clock). Directions alternate which runs first. Reported per task: means over seeds of the
accuracies, the median wall time of each direction and their ratio backward/forward (the spec's
bar: within 1.10), the R^2 between premodulo and margin over each run's sum cache (the spec's
bar: > 0.7), and whether the spec's claim holds for the backward run: train accuracy settles in
60-80% while eval accuracy rises (final eval above the first epoch's).

Then the sum cache at scale: ``measure_memory`` fills a cache with ``--memory-neurons`` neurons x
``--memory-runs`` trainings (pruning on, ``--keep-last`` per neuron) and reports its bytes and
the peak traced memory (the spec's bar: < 100 MB for 10k neurons x 1,000 runs).

    .venv/bin/python benchmarks/hashtron.py
    .venv/bin/python benchmarks/hashtron.py --tasks isalnum majority --seeds 1 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any

from kiln.hashtron.multitask import build_pipeline
from kiln.hashtron.settings import HashtronSettings, TaskSettings
from kiln.hashtron.sum_cache import measure_memory
from kiln.hashtron.tasks import load_task

DEFAULT_TASKS = ["isalnum", "majority", "squareroot", "digits"]
TASK_OPTIONS: dict[str, dict[str, Any]] = {"squareroot": {"n": 1024}}


def run_one(task_name: str, direction: str, seed: int, epochs: int, task) -> dict[str, Any]:
    """Train one pipeline to the end; time only the steps."""
    settings = HashtronSettings.from_dict({
        "task": {"name": task_name, "options": TASK_OPTIONS.get(task_name, {})},
        "pipeline": {"direction": direction, "epochs": epochs}})
    pipeline, _ = build_pipeline(settings, seed, task=task)
    epoch_evals = []
    start = time.perf_counter()
    while not pipeline.done:
        report = pipeline.step()
        if report.epoch_end:
            epoch_evals.append(report.eval_accuracy)
    seconds = time.perf_counter() - start
    acc = pipeline.evaluate()
    return {"task": task_name, "direction": direction, "seed": seed,
            "steps": pipeline.step_count, "seconds": seconds,
            "train": acc["train_accuracy"], "eval": acc["eval_accuracy"],
            "gap": acc["train_accuracy"] - acc["eval_accuracy"],
            "r2": pipeline.premodulo_margin_r2(), "epoch_evals": epoch_evals}


def summarise(runs: list[dict[str, Any]], task_name: str, baseline: float) -> dict[str, Any]:
    out: dict[str, Any] = {"task": task_name, "eval_majority_baseline": baseline}
    for direction in ("backward", "forward"):
        mine = [r for r in runs if r["direction"] == direction]
        out[direction] = {
            "train": statistics.mean(r["train"] for r in mine),
            "eval": statistics.mean(r["eval"] for r in mine),
            "gap": statistics.mean(r["gap"] for r in mine),
            "seconds": statistics.median(r["seconds"] for r in mine),
            "steps": statistics.mean(r["steps"] for r in mine),
            "r2": statistics.mean(r["r2"] for r in mine),
        }
    back = [r for r in runs if r["direction"] == "backward"]
    out["time_ratio"] = out["backward"]["seconds"] / out["forward"]["seconds"]
    out["per_step_ratio"] = ((out["backward"]["seconds"] / out["backward"]["steps"])
                             / (out["forward"]["seconds"] / out["forward"]["steps"]))
    out["claim_train_60_80"] = all(0.6 <= r["train"] <= 0.8 for r in back)
    out["claim_eval_rises"] = all(r["epoch_evals"][-1] > r["epoch_evals"][0] for r in back)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    lines = ["| task | direction | train | eval | gap | eval baseline | steps | seconds | "
             "R^2 | time ratio b/f (per step) | claim: train 60-80% / eval rises |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for direction in ("backward", "forward"):
            d = row[direction]
            extra = (f"{row['time_ratio']:.2f} ({row['per_step_ratio']:.2f})",
                     f"{'yes' if row['claim_train_60_80'] else 'no'} / "
                     f"{'yes' if row['claim_eval_rises'] else 'no'}") \
                if direction == "backward" else ("", "")
            lines.append(f"| {row['task']} | {direction} | {pct(d['train'])} | {pct(d['eval'])} "
                         f"| {pct(d['gap'])} | {pct(row['eval_majority_baseline'])} | "
                         f"{d['steps']:.0f} | {d['seconds']:.3f} | {d['r2']:.3f} | {extra[0]} "
                         f"| {extra[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--memory-neurons", type=int, default=10_000)
    parser.add_argument("--memory-runs", type=int, default=1_000)
    parser.add_argument("--keep-last", type=int, default=32)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, load average {os.getloadavg()}")
    rows, runs_all = [], []
    for name in args.tasks:
        if name == "digits" and importlib.util.find_spec("sklearn") is None:
            print("skipping digits: scikit-learn is not installed (extra kiln-train[digits])")
            continue
        task = load_task(TaskSettings(name=name, options=TASK_OPTIONS.get(name, {})))
        runs = []
        for seed in range(args.seeds):
            order = ("backward", "forward") if seed % 2 == 0 else ("forward", "backward")
            runs += [run_one(name, direction, seed, args.epochs, task) for direction in order]
        runs_all += runs
        rows.append(summarise(runs, name, task.majority_baseline("eval")))
        print(f"{name}: done ({len(task.train)} train / {len(task.eval)} eval samples)",
              flush=True)
    print()
    print(table(rows))
    memory = None
    if not args.skip_memory:
        memory = measure_memory(args.memory_neurons, args.memory_runs, args.keep_last)
        print()
        print(f"sum cache: {memory['neurons']} neurons x {memory['runs']} runs = "
              f"{memory['inserted']:,} records inserted, keep_last {memory['keep_last']}: "
              f"{memory['records']:,} kept, {memory['used_bytes'] / 2**20:.1f} MiB used, "
              f"{memory['allocated_bytes'] / 2**20:.1f} MiB allocated, peak traced "
              f"{memory['peak_traced_bytes'] / 2**20:.1f} MiB, {memory['seconds']:.1f} s")
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"summary": rows, "runs": runs_all, "memory": memory}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
