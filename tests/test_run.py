"""The run directory: one trainer at a time, and a crashed trainer never keeps the run locked."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln import workflows
from kiln.config import Config, resolve_config
from kiln.errors import RunError
from kiln.fsio import sha256_file
from kiln.repro import software_versions
from kiln.run import INPUTS, LOCK, SNAPSHOT, SOFTWARE, Run, list_runs

HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from kiln.run import Run
run = Run.open(Path(sys.argv[1]), echo=False)
run.claim()
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_run_in_training_cannot_be_resumed_beside_it(
    smoke_config: Callable[..., Config],
) -> None:
    run = Run.create(smoke_config(), echo=False)  # holds the lock, as `kiln train` does
    run.set_status("interrupted")
    with pytest.raises(RunError, match=r"in use by another kiln process \(pid \d+\)"):
        workflows.resume(run.path, echo=False)
    run.close()
    Run.open(run.path, echo=False).claim()  # released by close


def test_a_killed_trainer_leaves_the_run_resumable(smoke_config: Callable[..., Config]) -> None:
    created = Run.create(smoke_config(), echo=False)
    created.close()
    path = created.path
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert (path / LOCK).read_text().strip() == str(holder.pid)
        with pytest.raises(RunError, match=f"pid {holder.pid}"):
            Run.open(path, echo=False).claim()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process
        try:
            Run.open(path, echo=False).claim()
            break
        except RunError:
            assert time.monotonic() < deadline, "the lock outlived its process"
            time.sleep(0.05)


def test_a_killed_run_lists_its_last_logged_step(tmp_path: Path) -> None:
    """metrics.json is written when a run ends; before that the table reads metrics.jsonl."""
    run = tmp_path / "lm-1"
    run.mkdir()
    (run / SNAPSHOT).write_text("job: lm\n")
    (run / "status").write_text("running\n")
    rows = [{"step": 4, "loss": 3.5}, {"step": 5, "val_loss": 3.2}, {"step": 5, "loss": 3.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (listed,) = list_runs(tmp_path)
    assert (listed["status"], listed["step"], listed["loss"]) == ("running", 5, 3.25)
    # killed after a resume: the summary of the session before is older than the metrics
    (run / "metrics.json").write_text(json.dumps({"step": 4, "final_loss": 3.5, "val_ppl": 9}))
    (listed,) = list_runs(tmp_path)
    assert (listed["step"], listed["loss"], listed["val_ppl"]) == (5, 3.25, None)
    # a hashtron run logs steps without a loss
    (run / "metrics.json").unlink()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 7, "train_accuracy": 0.9}) + "\n")
    (listed,) = list_runs(tmp_path)
    assert (listed["step"], listed["loss"]) == (7, None)


def test_a_running_run_lists_its_last_evaluation(tmp_path: Path) -> None:
    """Before metrics.json exists (a run still training, or killed) the table shows the last
    logged validation perplexity and eval accuracy, not '-'."""
    lm, hashtron = tmp_path / "lm-1", tmp_path / "hashtron-1"
    for run, job in ((lm, "lm"), (hashtron, "hashtron")):
        run.mkdir()
        (run / SNAPSHOT).write_text(f"job: {job}\n")
        (run / "status").write_text("running\n")
    rows = [{"step": 10, "loss": 3.5}, {"event": "eval", "step": 10, "val_loss": 3.0,
            "val_ppl": 20.1}, {"step": 15, "loss": 3.25}]
    (lm / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = [{"step": 1, "eval_accuracy": 0.6}, {"step": 2, "eval_accuracy": 0.7}]
    (hashtron / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    listed = {row["id"]: row for row in list_runs(tmp_path)}
    assert (listed["lm-1"]["step"], listed["lm-1"]["val_ppl"]) == (15, 20.1)
    assert (listed["hashtron-1"]["step"], listed["hashtron-1"]["eval_acc"]) == (2, 0.7)


def test_resuming_under_other_software_logs_a_warning_naming_what_changed(
    tmp_path: Path, smoke_config: Callable[..., Config]
) -> None:
    run = Run.create(resolve_config(smoke_config()), echo=False)
    assert json.loads((run.path / SOFTWARE).read_text()) == software_versions()
    run.note_software_changes()  # the same software: nothing to say
    assert "warning" not in (run.path / "train.log").read_text()
    (run.path / SOFTWARE).write_text(json.dumps({**software_versions(), "torch": "2.0.0"}))
    run.note_software_changes()
    run.close()
    log = (run.path / "train.log").read_text()
    assert "warning: resuming under other software" in log
    assert f"torch 2.0.0 -> {software_versions()['torch']}" in log
    assert "kiln " not in log.split("warning:")[1].split("):")[0]  # only what changed is named


def test_resume_refuses_input_files_that_changed_since_the_start(
    tmp_path: Path, smoke_config: Callable[..., Config]
) -> None:
    cot = tmp_path / "cot.jsonl"
    packaged = Path(__file__).parents[1] / "src/kiln/data/examples/cot_python.jsonl"
    cot.write_bytes(packaged.read_bytes())
    run = Run.create(resolve_config(smoke_config(f"objectives.cot.path={cot}")), echo=False)
    run.set_status("interrupted")
    run.close()
    assert json.loads((run.path / INPUTS).read_text()) == {"objectives.cot.path": sha256_file(cot)}
    Run.open(run.path, echo=False).check_inputs()  # unchanged: fine
    cot.write_bytes(cot.read_bytes() + b"\n")
    with pytest.raises(RunError, match=rf"objectives.cot.path \({cot}\) has changed since run"):
        workflows.resume(run.path, echo=False)
    cot.unlink()
    with pytest.raises(RunError, match="is gone since run"):
        Run.open(run.path, echo=False).check_inputs()


def test_export_and_generate_only_read_the_run_directory(
    smoke_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run on a read-only mount (an archive, a shared folder) still exports and
    samples: neither command opens the run's log or metrics for writing."""
    run = workflows.train(smoke_config("training.max_steps=2"), echo=False).run_dir
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    real_open = open

    def read_only_run(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(c in mode for c in "wax+") and Path(file).is_relative_to(run):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_run)
    workflows.export_run(run, tmp_path / "bundle")
    assert workflows.generate(run, "def ", max_new_tokens=2).startswith("def ")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_the_log_takes_a_message_naming_a_file_whose_name_is_not_utf8(
    smoke_config: Callable[..., Config],
) -> None:
    run = Run.create(resolve_config(smoke_config()), echo=False)
    run.log("skipped " + os.fsdecode(b"caf\xe9.py"))
    run.close()
    assert "skipped caf\\udce9.py" in (run.path / "train.log").read_text(encoding="utf-8")


def test_a_run_opened_from_inside_keeps_its_id(
    smoke_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kiln resume .` in the run directory: the summary's run_id and the log name the run."""
    created = Run.create(resolve_config(smoke_config()), echo=False)
    created.close()
    monkeypatch.chdir(created.path / "checkpoints")
    assert Run.open(Path(".."), echo=False).id == created.id
    monkeypatch.chdir(created.path)
    assert Run.open(Path("."), echo=False).id == created.id


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"job: lm\nseed: [\n", "valid YAML"), ("job: lm\n".encode("utf-16"), "UTF-8 text")],
)
def test_a_damaged_snapshot_is_a_run_error(tmp_path: Path, content: bytes, what: str) -> None:
    (tmp_path / SNAPSHOT).write_bytes(content)
    with pytest.raises(RunError, match=rf"(?s){SNAPSHOT} is not {what}: .* restore it from a copy"):
        Run.open(tmp_path)
