"""`kiln ... --nproc N` hands the same arguments, less --nproc, to torchrun."""

from __future__ import annotations

import sys

import pytest

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
