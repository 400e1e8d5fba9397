"""A streamed run whose store went missing after it committed is refused, never restarted."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln import workflows
from kiln.config import Config
from kiln.errors import CheckpointError
from kiln.run import read_metrics
from kiln.streaming.location import STORE_RECORD, store_root
from kiln.streaming.store import MANIFEST

ConfigFactory = Callable[..., Config]


def _train(smoke_config: ConfigFactory, *overrides: str) -> tuple[Config, Path]:
    config = smoke_config("strategy.name=streaming", "training.max_steps=2",
                          "eval.every_steps=0", *overrides)
    run = workflows.train(config, echo=False).run_dir
    (run / "status").write_text("interrupted\n")
    return config, run


def _loss_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run) if "loss" in r]


def _point_snapshot_at(run: Path, old: Path, new: Path) -> None:
    snapshot = run / "config_snapshot.yaml"
    snapshot.write_text(snapshot.read_text().replace(str(old), str(new)))


def test_a_resume_whose_store_is_gone_is_refused_not_restarted(
    smoke_config: ConfigFactory, tmp_path: Path
) -> None:
    moved, elsewhere = tmp_path / "store-a", tmp_path / "store-b"
    _, run = _train(smoke_config, "logging.every_steps=1", f"strategy.store_dir={moved}")
    _point_snapshot_at(run, moved, elsewhere)
    gone = (
        rf"run {re.escape(str(run))} has trained, but its "
        rf"chunk store {re.escape(str(elsewhere / run.name))} does not exist \(it was at "
        rf"{re.escape(str(moved / run.name))}\).*strategy.store_dir changed since"
    )
    with pytest.raises(CheckpointError, match=gone):
        workflows.resume(run, echo=False)
    assert not elsewhere.exists() and _loss_steps(run) == [1, 2]
    # Reading the run (export, eval, generate) says the same, not "no checkpoints yet".
    with pytest.raises(CheckpointError, match=gone):
        workflows.export_run(run, tmp_path / "bundle")


def test_a_run_that_committed_before_logging_a_step_is_refused_too(
    smoke_config: ConfigFactory, tmp_path: Path
) -> None:
    moved, elsewhere = tmp_path / "store-a", tmp_path / "store-b"
    _, run = _train(smoke_config, "logging.every_steps=100", f"strategy.store_dir={moved}")
    # As if killed at step 1 of many: committed, but nothing logged yet.
    (run / "metrics.jsonl").write_text("")
    _point_snapshot_at(run, moved, elsewhere)
    with pytest.raises(CheckpointError, match="has trained, but its chunk store"):
        workflows.resume(run, echo=False)
    assert not elsewhere.exists()


def test_a_store_that_lost_its_manifest_is_refused(
    smoke_config: ConfigFactory, tmp_path: Path
) -> None:
    config, run = _train(smoke_config)
    (store_root(config, run) / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=rf"chunk store \S+ has no {MANIFEST}: it was moved"):
        workflows.resume(run, echo=False)


def test_the_note_names_the_store_and_a_run_from_before_it_gets_one_on_resume(
    smoke_config: ConfigFactory,
) -> None:
    config, run = _train(smoke_config)
    note = run / STORE_RECORD
    assert str(store_root(config, run).resolve()) in note.read_text()
    note.unlink()
    assert workflows.resume(run, echo=False).status == "completed"
    assert note.is_file()
