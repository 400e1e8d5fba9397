"""`kiln ... --nproc N` hands the same arguments, less --nproc, to torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.errors import KilnError
from kiln.launch import torchrun_command, without_nproc


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


def test_torchrun_command_runs_kiln_as_a_module() -> None:
    command = torchrun_command(4, ["resume", "runs/x", "--nproc", "4"])
    assert command == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
        "-m", "kiln", "resume", "runs/x",
    ]
    with pytest.raises(KilnError, match="--nproc must be >= 1"):
        torchrun_command(0, ["train"])


def test_nproc_with_a_one_process_strategy_exits_2_before_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--nproc", "2", "--config", "smoke", "--set",
                 f"run.root={tmp_path}"])
    assert code == 2
    assert "add --set strategy.name=ddp" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
