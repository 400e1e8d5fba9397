"""Each rank's share of the global step batch, and the per-rank sample-id log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.engine.placement import Local
from kiln.engine.rank_batches import RankBatches, SampleLog


class _Rank(Local):
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


class _Steps:
    """Global step batches of 8 rows numbered by step."""

    def __init__(self) -> None:
        self.step = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.step += 1
        rows = torch.arange(8) + 100 * self.step
        return {"tokens": rows[:, None].repeat(1, 3), "weights": rows.float()}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ranks_partition_each_step_without_overlap_or_gap(world: int) -> None:
    shares = [RankBatches(_Steps(), _Rank(r, world)) for r in range(world)]
    for _ in range(3):
        parts = [share.next_batch() for share in shares]
        reference = _Steps()
        reference.step = shares[0].state_dict()["step"] - 1
        expected = reference.next_batch()
        for key in expected:
            assert torch.equal(torch.cat([p[key] for p in parts]), expected[key])


def test_sample_log_drops_steps_after_the_resumed_one(tmp_path: Path) -> None:
    folder = tmp_path / "samples"
    folder.mkdir()
    rows = [json.dumps({"step": s, "windows": [["code", s]]}) for s in (1, 2, 3)]
    for rank in (0, 1):  # rank 1 of an earlier, larger world, and a row torn by a kill
        (folder / f"rank{rank}.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "wi')
    log = SampleLog(tmp_path, Local())
    log.begin(2)
    log.record([["code", 7]])
    log.close()
    lines = (folder / "rank0.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [1, 2, 3]
    assert len((folder / "rank1.jsonl").read_text().splitlines()) == 2
    assert json.loads((folder / "rank0.jsonl").read_text().splitlines()[-1])["windows"] == [
        ["code", 7]
    ]
