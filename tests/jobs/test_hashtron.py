"""The hashtron job end to end: run directory, checkpoints, export, kill/resume, commands."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln import workflows
from kiln.checkpoint import list_checkpoints, load_latest_valid
from kiln.config import Config, load_config
from kiln.errors import ConfigError, DataError, RunError
from kiln.hashtron import load_network
from kiln.hashtron.settings import template
from kiln.hashtron.sum_cache import DETERMINISTIC
from kiln.hashtron.tasks import load_task
from kiln.run import read_metrics, read_summary

ConfigFactory = Callable[..., Config]
_EXPORTS = itertools.count()

# isalnum: 256 samples, 16 + 1 neurons; 2 epochs are 35 steps (17 + the phase-0 bootstrap of
# the final neuron, then 17 per epoch).
TINY = ("hashtron.task.name=isalnum", "hashtron.pipeline.epochs=2")
# Long enough (52 steps, a checkpoint after each) to be killed part-way; every step trains.
KILLABLE = ("hashtron.task.name=majority", "hashtron.task.options.samples=1024",
            "hashtron.pipeline.epochs=3", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
            "logging.every_steps=1000")
KILLABLE_STEPS = 52


def hashtron_args(root: Path, *overrides: str) -> list[str]:
    """``--set`` overrides of the packaged hashtron config, with runs under ``root``."""
    return [f"run.root={root}", "hardware.device=cpu", "hardware.threads=2", *overrides]


@pytest.fixture
def hashtron_config(tmp_path: Path) -> ConfigFactory:
    """The packaged hashtron config on the tiny isalnum task; extra ``key=value`` overrides."""

    def make(*overrides: str) -> Config:
        return load_config("hashtron", hashtron_args(tmp_path / "experiments", *TINY, *overrides))

    return make


def _kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def _sets(overrides: list[str]) -> list[str]:
    return [x for item in overrides for x in ("--set", item)]


def exported_network(run_dir: Path, out_root: Path) -> bytes:
    """network.safetensors bytes of the run's export (its latest checkpoint)."""
    out = out_root / f"export-{run_dir.name}-{next(_EXPORTS)}"
    workflows.export_run(run_dir, out, "latest")
    return (out / "network.safetensors").read_bytes()


def final_state(run_dir: Path) -> dict[str, Any]:
    """The pipeline state of the run's latest checkpoint."""
    found = load_latest_valid(run_dir / "checkpoints", warn=print)
    assert found is not None
    return found[1]["pipeline"]


def step_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows without their wall-clock field."""
    return [{k: v for k, v in row.items() if k != "duration_s"} for row in read_metrics(run_dir)]


def assert_same_training(a: Path, b: Path, out_root: Path) -> None:
    """Same network bytes, same deterministic sum cache and counters, same metrics rows."""
    assert exported_network(a, out_root) == exported_network(b, out_root)
    sa, sb = final_state(a), final_state(b)
    for name in DETERMINISTIC:
        np.testing.assert_array_equal(sa["cache"]["columns"][name],
                                      sb["cache"]["columns"][name], err_msg=name)
    assert sa["cache"]["columns"]["s"].size > 0
    for key in ("rng", "counters", "alerts", "data"):
        assert sa[key] == sb[key], key
    rows_a, rows_b = step_rows(a), step_rows(b)
    assert rows_a == rows_b
    steps = [r["step"] for r in rows_a if "event" not in r]
    assert steps == list(range(1, len(steps) + 1)), "metrics rows repeat or skip after resume"
    summaries = [json.loads((run / "metrics.json").read_text()) for run in (a, b)]
    for summary in summaries:
        del summary["run_id"], summary["wall_time_sec"]
    assert summaries[0] == summaries[1]


# ---------------------------------------------------------------------- one run


def test_train_writes_a_complete_run_directory(hashtron_config: ConfigFactory,
                                               tmp_path: Path) -> None:
    cfg = hashtron_config("checkpoint.every_steps=10", "hashtron.alerts.train_accuracy=0.8")
    outcome = workflows.train(cfg, echo=False)
    run = outcome.run_dir
    assert outcome.status == "completed" and outcome.step == 35
    assert (run / "status").read_text().strip() == "completed"
    for name in ("config_snapshot.yaml", "train.log", "metrics.jsonl", "metrics.json"):
        assert (run / name).is_file(), name
    assert "job: hashtron" in (run / "config_snapshot.yaml").read_text()

    rows = read_metrics(run)
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 36))
    for key in ("layer", "neuron", "phase", "s", "n", "margin", "premodulo", "regime",
                "gold_per_layer", "margin_histogram", "train_accuracy", "eval_accuracy",
                "tier", "outcome", "epoch"):
        assert all(key in r for r in steps), key
    first = steps[0]
    assert (first["phase"], first["layer"], first["tier"]) == (0, 1, "bootstrap")
    assert first["premodulo"] == first["n"] == 192  # phase 0: premodulo N (192 train samples)
    for r in steps:
        assert r["margin"] == pytest.approx(abs(r["s"]) / r["n"])
        assert r["regime"] in ("noisy", "gold", "collapsed")
        assert len(r["gold_per_layer"]) == 2 and len(r["margin_histogram"]) == 2
        assert all(len(h) == cfg.hashtron.cache.histogram_bins for h in r["margin_histogram"])
        assert 0.0 <= r["train_accuracy"] <= 1.0
    assert all(r["eval_accuracy"] is not None for r in steps)  # eval_every_steps: 1
    # histograms count each neuron's latest margin: 16 first-layer neurons once all trained
    assert sum(steps[-1]["margin_histogram"][0]) == 16
    assert sum(steps[-1]["margin_histogram"][1]) == 1

    alerts = [r for r in rows if r.get("event") == "alert"]
    assert alerts and alerts[0]["kind"] == "memorisation"
    assert alerts[0]["train_accuracy"] > 0.8
    log = (run / "train.log").read_text()
    assert "ALERT memorisation" in log and "hashtron task isalnum" in log
    assert "regime" in log and "checkpoint step_00000035" in log

    summary = read_summary(run)
    assert summary["job"] == "hashtron" and summary["step"] == 35
    assert summary["status"] == "completed"
    assert summary["train_accuracy"] == steps[-1]["train_accuracy"]
    assert summary["eval_accuracy"] == steps[-1]["eval_accuracy"]
    assert outcome.final_eval == {"train_accuracy": summary["train_accuracy"],
                                  "eval_accuracy": summary["eval_accuracy"]}
    # every 10 steps and at the end; the packaged config keeps the last 3
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [20, 30, 35]

    bundle = workflows.export_run(run, tmp_path / "bundle")
    assert set(os.listdir(bundle)) == {"network.safetensors", "config.yaml", "metadata.json",
                                       "SHA256SUMS"}
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["job"] == "hashtron" and metadata["step"] == 35
    # the exported network really is the trained one: it reproduces the reported accuracy
    network = load_network(bundle / "network.safetensors")
    task = load_task(cfg.hashtron.to_settings().task)
    assert network.accuracy(task.eval.features, task.eval.labels) == summary["eval_accuracy"]
    assert network.accuracy(task.train.features, task.train.labels) == summary["train_accuracy"]
    # isalnum has one feature per sample: a row of another width would silently be misread
    assert network.n_features == 1
    with pytest.raises(DataError, match=r"got 2 per sample, but this network reads 1"):
        network.forward(np.zeros((3, 2), dtype=np.uint32))
    assert _kiln("export", "--verify", str(bundle)).returncode == 0


def test_identical_configs_give_identical_networks(hashtron_config: ConfigFactory,
                                                   tmp_path: Path) -> None:
    a = workflows.train(hashtron_config(), echo=False).run_dir
    b = workflows.train(hashtron_config(), echo=False).run_dir
    assert a != b
    assert_same_training(a, b, tmp_path)
    c = workflows.train(hashtron_config("seed=1"), echo=False).run_dir
    assert exported_network(a, tmp_path) != exported_network(c, tmp_path)


def test_resume_of_completed_run_is_refused(hashtron_config: ConfigFactory) -> None:
    run = workflows.train(hashtron_config(), echo=False).run_dir
    with pytest.raises(RunError, match="already completed"):
        workflows.resume(run, echo=False)
    refused = _kiln("resume", str(run))
    assert refused.returncode == 2 and "already completed" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_resume_without_a_checkpoint_starts_over(hashtron_config: ConfigFactory,
                                                 tmp_path: Path) -> None:
    straight = workflows.train(hashtron_config(), echo=False).run_dir
    run = workflows.train(hashtron_config(), echo=False).run_dir
    for ckpt in list_checkpoints(run / "checkpoints"):  # as if killed before the first one
        for file in ckpt.path.iterdir():
            file.unlink()
        ckpt.path.rmdir()
    (run / "status").write_text("running\n")
    assert workflows.resume(run, echo=False).status == "completed"
    assert_same_training(straight, run, tmp_path)


def test_lm_only_commands_refuse_a_hashtron_run(hashtron_config: ConfigFactory) -> None:
    run = workflows.train(hashtron_config(), echo=False).run_dir
    with pytest.raises(RunError, match="hashtron run"):
        workflows.evaluate_run(run)
    generated = _kiln("generate", str(run), "--prompt", "x")
    assert generated.returncode == 2 and "lm runs only" in generated.stderr


def test_runs_table_lists_a_hashtron_run(hashtron_config: ConfigFactory) -> None:
    cfg = hashtron_config()
    run = workflows.train(cfg, echo=False).run_dir
    listing = _kiln("runs", cfg.run.root)
    assert listing.returncode == 0
    (line,) = [row for row in listing.stdout.splitlines() if row.startswith(run.name)]
    accuracy = read_summary(run)["eval_accuracy"]
    assert line.split()[1:4] == ["hashtron", "completed", "35"]
    assert line.split()[-1] == f"{accuracy:.4g}"


# ---------------------------------------------------------------------- config errors


@pytest.mark.parametrize(("override", "fragments"), [
    ("hashtron.task.name=nosuch", ["hashtron.task.name", "'nosuch'", "isalnum"]),
    ("hashtron.layers=[{width: 0}]", ["hashtron.layers[0].width", "got 0"]),
    ("hashtron.layers=[{width: 4}, {width: 1, combiner: {kind: bogus}}]",
     ["hashtron.layers[1].combiner"]),
    ("hashtron.task.options.n=64", ["hashtron.task.options", "'isalnum'"]),
    ("hashtron.capacity.damping=heavy", ["hashtron.capacity.damping", "'heavy'"]),
    ("hashtron.layers=[{width: 16, combiner: {kind: sum, dims: [8]}}, {width: 1}]",
     ["hashtron.layers[0].combiner: sum combiner", "dims [8]"]),
    ("hashtron.layers=[{width: 16}, {width: 1}]", ["hashtron.layers[0] needs a combiner"]),
    ("hashtron.layers=[{width: 65}]", ["hashtron.layers[0].width", "at most 64"]),
    (("hashtron.task.name=majority",  # 4 nibble features, read by only 2 neurons
      "hashtron.layers=[{width: 2, combiner: {kind: sum, dims: [2]}}, {width: 1}]"),
     ["hashtron.layers[0].width is 2", "4 features", "widen the first layer"]),
    (("hashtron.cache.keep_last=3",),
     ["hashtron.alerts.oscillation_window: got 4", "keep_last = 3"]),
])
def test_bad_hashtron_values_name_the_key_and_create_no_run(
    hashtron_config: ConfigFactory, tmp_path: Path, override: str | tuple[str, ...],
    fragments: list[str]
) -> None:
    overrides = (override,) if isinstance(override, str) else override
    with pytest.raises(ConfigError) as info:
        workflows.train(hashtron_config(*overrides), echo=False)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"
    root = tmp_path / "experiments"
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize(("overrides", "fragment"), [
    (("hashtron.layers=[{width: 16, combiner: {kind: full, step: 2.5, maxbits: 4}}, "
      "{width: 1}]",), "hashtron.layers[0].combiner.step: got 2.5, expected an integer"),
    (("hashtron.layers=[{width: 16, combiner: {kind: sum, dims: ab}}, {width: 1}]",),
     "hashtron.layers[0].combiner.dims: got 'ab', expected a non-empty list"),
    (("hashtron.task.name=majority", "hashtron.task.options.seed=-1"),
     "hashtron.task.options.seed: got -1, expected a value >= 0"),
    (("hashtron.task.name=squareroot", "hashtron.task.options.n=1.5"),
     "hashtron.task.options.n: got 1.5, expected an integer"),
    (("hashtron.task.name=squareroot", "hashtron.task.options.size=4"),
     "hashtron.task.options.size: unknown option for task 'squareroot'; it takes n"),
])
def test_bad_combiner_fields_and_task_options_exit_2_and_create_no_run(
    tmp_path: Path, overrides: tuple[str, ...], fragment: str
) -> None:
    root = tmp_path / "experiments"
    proc = _kiln("train", "--config", "hashtron", *_sets(hashtron_args(root, *overrides)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert fragment in proc.stderr, proc.stderr
    assert not root.exists() or not any(root.iterdir())


def test_bad_hashtron_config_exits_2_naming_the_key_path(tmp_path: Path) -> None:
    root = tmp_path / "experiments"
    proc = _kiln("train", "--config", "hashtron",
                 *_sets(hashtron_args(root, "hashtron.pipeline.epochs=0")))
    assert proc.returncode == 2
    assert "hashtron.pipeline.epochs: got 0" in proc.stderr and "Traceback" not in proc.stderr
    assert not root.exists() or not any(root.iterdir())


def test_packaged_hashtron_configs_are_the_templates() -> None:
    for name, kind in (("hashtron", "backward"), ("hashtron_forward", "forward")):
        cfg = load_config(name)
        assert cfg.job == "hashtron"
        settings = cfg.hashtron.to_settings()
        assert settings.replace(task={"name": "isalnum"}, pipeline={"epochs": 3}) == \
            template(kind)


# ---------------------------------------------------------------------- multi-task command


def test_multi_task_command_trains_and_reports_each_task() -> None:
    tasks = ["isalnum", "isdigit", "isupper", "ispunct", "isxdigit"]
    proc = _kiln("hashtron-tasks", "--tasks", ",".join(tasks),
                 "--set", "hashtron.pipeline.epochs=1")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == tasks
    for row in rows:
        assert row[1].strip() == "yes"
        train = float(row[2].strip().rstrip("%"))
        assert 50.0 <= train <= 100.0  # at least the prior of a character class
        assert int(row[6]) == 18  # the bootstrap neuron, then one epoch of 17
    assert all(f"task {t}: ok" in proc.stderr for t in tasks)


def test_multi_task_command_exits_2_when_a_task_fails() -> None:
    # one output neuron fits the 1-bit labels of isalnum and isdigit, not squareroot's 5 bits:
    # squareroot fails when its network is built, the tasks around it still run
    layers = "[{width: 16, combiner: {kind: full, step: 16, maxbits: 16}}, {width: 1}]"
    proc = _kiln("hashtron-tasks", "--tasks", "isalnum,squareroot,isdigit",
                 "--set", "hashtron.pipeline.epochs=1", "--set", f"hashtron.layers={layers}")
    assert proc.returncode == 2
    assert "| isalnum | yes |" in proc.stdout and "| isdigit | yes |" in proc.stdout
    assert "| squareroot | NO: " in proc.stdout
    assert "error: task squareroot failed: hashtron.layers[1].width is 1" in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--tasks", "isalnum,csv"), "--tasks: csv needs a data file"),
    (("--tasks", "isalnum,squareroot", "--set", "hashtron.task.options.n=64"),
     "hashtron.task.options: kiln hashtron-tasks trains every task with its default options"),
])
def test_multi_task_command_refuses_data_files_and_options_before_training_any(
    args: tuple[str, ...], message: str
) -> None:
    proc = _kiln("hashtron-tasks", *args)
    assert proc.returncode == 2 and "task isalnum" not in proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_multi_task_command_refuses_an_unknown_task_before_training_any() -> None:
    proc = _kiln("hashtron-tasks", "--tasks", "isalnum,nosuch")
    assert proc.returncode == 2 and "task isalnum" not in proc.stderr
    assert "unknown hashtron task(s) nosuch; the tasks are: " in proc.stderr


# ---------------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference run of the killable config."""
    root = tmp_path_factory.mktemp("straight")
    cfg = load_config("hashtron", hashtron_args(root, *KILLABLE))
    outcome = workflows.train(cfg, echo=False)
    assert outcome.step == KILLABLE_STEPS
    return outcome.run_dir


def _latest_step(root: Path) -> int:
    steps = [int(p.name[len("step_"):]) for p in root.glob("*/checkpoints/step_*")]
    return max(steps, default=-1)


def _kill_and_resume(straight: Path, tmp_path: Path, seed: int, sig: int) -> None:
    """Start the killable run, send ``sig`` after a random checkpoint (plus a random delay
    inside the next steps), resume it, and compare it with the uninterrupted run."""
    rng = random.Random(seed)
    target, delay = rng.randrange(1, KILLABLE_STEPS - 4), rng.uniform(0.0, 0.05)
    root = tmp_path / "killed"
    log = tmp_path / "output.txt"
    with log.open("w") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiln", "train", "--config", "hashtron",
             *_sets(hashtron_args(root, *KILLABLE))],
            stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while _latest_step(root) < target:
            assert proc.poll() is None, f"training ended early: {log.read_text()}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.002)
        time.sleep(delay)
        assert proc.poll() is None, "training finished before the signal: lengthen the run"
        proc.send_signal(sig)
        proc.wait(timeout=120)
    (run,) = root.iterdir()
    logged = len([r for r in read_metrics(run) if "event" not in r])
    latest = list_checkpoints(run / "checkpoints")[-1].step
    assert target <= latest <= logged  # a SIGKILL may land between a row and its checkpoint
    if sig == signal.SIGINT:
        assert latest == logged  # the stop checkpointed every step it logged
        assert proc.returncode == 130
        assert (run / "status").read_text().strip() == "interrupted"
        assert f"kiln resume {run}" in log.read_text()
    else:
        assert (run / "status").read_text().strip() == "running"
    resumed = _kiln("resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "status").read_text().strip() == "completed"
    assert_same_training(straight, run, tmp_path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_point_then_resume_is_byte_identical(
    straight_run: Path, tmp_path: Path, seed: int
) -> None:
    _kill_and_resume(straight_run, tmp_path, seed, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 23))
def test_sigkill_many_points(straight_run: Path, tmp_path: Path, seed: int) -> None:
    _kill_and_resume(straight_run, tmp_path, seed, signal.SIGKILL)


def test_sigint_checkpoints_marks_interrupted_and_resumes(
    straight_run: Path, tmp_path: Path
) -> None:
    _kill_and_resume(straight_run, tmp_path, 7, signal.SIGINT)
