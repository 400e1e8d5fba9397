"""The training loop's checkpoints and resume: metrics after a resume from nothing, the final
evaluation in the final checkpoint, and a checkpoint written for another model config."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln import cli, workflows
from kiln.checkpoint import list_checkpoints, load_checkpoint
from kiln.config import Config
from kiln.engine.trainer import Trainer
from kiln.errors import CheckpointError
from kiln.jobs.lm import LMJob
from kiln.run import read_metrics
from kiln.streaming.export import committed_checkpoint
from kiln.streaming.location import STORE_RECORD, store_root
from kiln.streaming.store import MANIFEST

ConfigFactory = Callable[..., Config]
STRATEGIES = {"single": (), "streaming": ("strategy.name=streaming",)}


def _final_state(config: Config, run: Path) -> tuple[dict, dict]:
    """(meta, state) of the run's last checkpoint (a streamed run's last commit)."""
    streamed = committed_checkpoint(config, run)
    if streamed is not None:
        return streamed[0].meta, streamed[1]
    state, meta = load_checkpoint(list_checkpoints(run / "checkpoints")[-1].path)
    return meta, state


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_without_a_checkpoint_drops_the_metrics_of_the_lost_steps(
    smoke_config: ConfigFactory, strategy: str
) -> None:
    config = smoke_config("training.max_steps=3", "logging.every_steps=1",
                          *STRATEGIES[strategy])
    run = workflows.train(config, echo=False).run_dir
    # As if killed before the first checkpoint (the first commit), with its rows logged.
    if strategy == "streaming":
        (store_root(config, run) / MANIFEST).unlink()
        (run / STORE_RECORD).unlink()
    else:
        for info in list_checkpoints(run / "checkpoints"):
            for file in info.path.iterdir():
                file.unlink()
            info.path.rmdir()
    (run / "status").write_text("interrupted\n")
    assert workflows.resume(run, echo=False).status == "completed"
    assert "no checkpoint yet: starting from step 0" in (run / "train.log").read_text()
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(run) if r.get("event") == "eval"] == [3]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_last_checkpoint_records_the_final_evaluation(
    smoke_config: ConfigFactory, tmp_path: Path, strategy: str
) -> None:
    # The last step is a checkpoint step (every step commits when streamed); no periodic eval.
    config = smoke_config("training.max_steps=3", "checkpoint.every_steps=3",
                          "eval.every_steps=0", *STRATEGIES[strategy])
    outcome = workflows.train(config, echo=False)
    (final,) = [r for r in read_metrics(outcome.run_dir) if r.get("event") == "eval"]
    assert final["step"] == 3 and outcome.val_loss == final["val_loss"]

    meta, state = _final_state(config, outcome.run_dir)
    assert meta["step"] == 3 and meta["val_loss"] == final["val_loss"]
    assert state["progress"]["last_val"]["step"] == 3
    assert state["progress"]["last_val"]["val_loss"] == final["val_loss"]
    workflows.export_run(outcome.run_dir, tmp_path / "export", "latest")
    metadata = json.loads((tmp_path / "export" / "metadata.json").read_text())
    assert metadata["val_loss"] == final["val_loss"]


def test_resume_with_a_checkpoint_of_another_model_config_exits_2_naming_it(
    smoke_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    run = workflows.train(smoke_config("training.max_steps=2", "checkpoint.every_steps=2",
                                       "eval.every_steps=0"), echo=False).run_dir
    snapshot = run / "config_snapshot.yaml"
    snapshot.write_text(snapshot.read_text().replace("n_layers: 2", "n_layers: 3"))
    (run / "status").write_text("interrupted\n")
    capsys.readouterr()
    assert cli.main(["resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert str(run / "checkpoints" / "step_00000002") in line
    assert "different model config" in line and "missing keys blocks.2." in line
    with pytest.raises(CheckpointError, match=r"missing keys .* and 9 more\)"):
        workflows.resume(run, echo=False)


def test_a_stop_right_after_a_checkpoint_does_not_write_it_again(
    smoke_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    saves: list[int] = []
    real_save, real_evaluate = Trainer.save, Trainer.evaluate

    def counted_save(self: Trainer, *args: object, **kwargs: object) -> None:
        saves.append(self.progress.step)
        real_save(self, *args, **kwargs)

    def ctrl_c_at_step_2(self: Trainer) -> None:
        real_evaluate(self)
        if self.progress.step == 2:
            signal.raise_signal(signal.SIGINT)  # arrives before the step's checkpoint

    monkeypatch.setattr(Trainer, "save", counted_save)
    monkeypatch.setattr(Trainer, "evaluate", ctrl_c_at_step_2)
    config = smoke_config("training.max_steps=6", "checkpoint.every_steps=1",
                          "eval.every_steps=1")
    outcome = workflows.train(config, echo=False)
    assert (outcome.status, outcome.step) == ("interrupted", 2)
    assert saves == [1, 2]


def test_a_diverged_evaluation_is_never_the_best(
    smoke_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    losses = iter([float("nan"), 5.0, 4.0, 6.0])

    def scripted(self: LMJob, model: object, *, final: bool = False) -> dict:
        return {"val_loss": next(losses)}

    monkeypatch.setattr(LMJob, "evaluate", scripted)
    config = smoke_config("training.max_steps=4", "eval.every_steps=1", "checkpoint.every_steps=4")
    run = workflows.train(config, echo=False).run_dir
    _, state = _final_state(config, run)
    assert (state["progress"]["best_val_loss"], state["progress"]["best_step"]) == (4.0, 3)
