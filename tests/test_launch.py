"""`kiln ... --nproc N` hands the same arguments, less --nproc, to torchrun."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch.distributed.run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from kiln import launch
from kiln.cli import main
from kiln.config import load_config
from kiln.errors import KilnError
from kiln.launch import torchrun_args, without_nproc
from kiln.run import Run


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--nproc", "2", "--config", "smoke"],
        ["train", "--nproc=2", "--config", "smoke"],
        ["train", "--config", "smoke", "--nproc", "2"],
    ],
)
def test_nproc_is_removed_and_the_rest_kept_in_order(args: list[str]) -> None:
    assert without_nproc(args) == ["train", "--config", "smoke"]


def test_torchrun_runs_kiln_as_a_module() -> None:
    args = torchrun_args(4, ["resume", "runs/x", "--nproc", "4"])
    assert args == ["--standalone", "--nproc-per-node=4", "-m", "kiln", "resume", "runs/x"]
    with pytest.raises(KilnError, match="--nproc must be >= 1"):
        torchrun_args(0, ["train"])


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ({0: 130, 1: 130}, 130), ({0: 2, 1: 2}, 2), ({0: 2, 1: 130}, 2), ({0: 2, 1: -9}, 1),
        # terminated by torchrun while exiting, after the other worker ended first
        ({0: -15, 1: 130}, 130), ({0: 2, 1: -15}, 2), ({0: -15, 1: -15}, 1),
    ],
)
def test_the_agents_ending_becomes_kilns_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    codes: dict[int, int], expected: int,
) -> None:
    def failing(_args: object) -> None:
        failures = {rank: ProcessFailure(rank, 1000 + rank, code, "") for rank, code in
                    codes.items()}
        raise ChildFailedError("kiln", failures)

    monkeypatch.setattr(torch.distributed.run, "run", failing)
    assert launch.run_torchrun(2, ["train"]) == expected
    err = capsys.readouterr().err
    assert ("workers failed (rank 0: exit code" in err) == (expected == 1)

    def signalled(_args: object) -> None:
        raise SignalException("got SIGINT", signal.SIGINT)

    monkeypatch.setattr(torch.distributed.run, "run", signalled)
    assert launch.run_torchrun(2, ["train"]) == 130


def test_nproc_with_a_one_process_strategy_exits_2_before_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--nproc", "2", "--config", "smoke", "--set",
                 f"run.root={tmp_path}"])
    assert code == 2
    assert "add --set strategy.name=ddp" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as starting torchrun."""

    def refuse(nproc: int, kiln_args: list[str]) -> None:
        raise AssertionError(f"torchrun was started: {kiln_args}")

    monkeypatch.setattr(launch, "run_torchrun", refuse)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.backend=nccl", "hardware.device=cpu"], "nccl needs hardware.device: cuda"),
        (["strategy.world_size=3", "training.micro_batch_size=1"],
         "global batch of 3 windows .* does not split over 2 processes"),
    ],
)
def test_what_every_worker_would_refuse_is_refused_once_before_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_torchrun: None,
    overrides: list[str], message: str,
) -> None:
    sets = [x for o in ["strategy.name=ddp", f"run.root={tmp_path}", *overrides]
            for x in ("--set", o)]
    assert main(["train", "--nproc", "2", "--config", "smoke", *sets]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("error:") == 1
    assert not any(tmp_path.iterdir())


def test_resume_of_a_completed_or_busy_run_is_refused_before_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_torchrun: None,
) -> None:
    config = load_config("smoke", [f"run.root={tmp_path}", "strategy.name=ddp"])
    run = Run.create(config, echo=False)  # holds the lock, as a trainer would
    assert main(["resume", str(run.path), "--nproc", "2"]) == 2
    assert "in use by another kiln process" in capsys.readouterr().err
    run.set_status("completed")
    run.close()
    assert main(["resume", str(run.path), "--nproc", "2"]) == 2
    assert "already completed" in capsys.readouterr().err


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_a_process_count_below_one_is_refused_before_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_torchrun: None, nproc: str
) -> None:
    sets = ["--set", "strategy.name=ddp", "--set", f"run.root={tmp_path}"]
    assert main(["train", "--nproc", nproc, "--config", "smoke", *sets]) == 2
    assert f"--nproc must be >= 1, got {nproc}" in capsys.readouterr().err
    run = Run.create(load_config("smoke", [f"run.root={tmp_path}", "strategy.name=ddp",
                                           "strategy.world_size=2"]), echo=False)
    run.close()
    assert main(["resume", str(run.path), "--nproc", nproc]) == 2
    assert f"--nproc must be >= 1, got {nproc}" in capsys.readouterr().err
