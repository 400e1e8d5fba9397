"""A streaming run's committed step read as a checkpoint, while the run may still commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.config import validate_config
from kiln.errors import CheckpointError
from kiln.streaming.export import committed_checkpoint
from kiln.streaming.store import ChunkStore, PartRecord, as_image, encode_state_json, record_dict


def _commit(store: ChunkStore, step: int, value: float) -> None:
    record = store.write(0, "lin", "w", step, as_image({"lin.weight": torch.full((64, 64), value)}))
    store.commit(
        {
            "step": step,
            "meta": {"step": step},
            "chunks": [{"name": "lin", "parts": {"w": record_dict(record), "s": None}}],
            "state_keys": [["weight", "lin.weight"]],
            "state": encode_state_json({"progress": {"step": step}}),
        }
    )


def test_a_commit_during_the_read_of_a_training_run_gives_the_newer_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = validate_config({"strategy": {"name": "streaming"}})
    (tmp_path / "run" / "stream").mkdir(parents=True)
    store = ChunkStore(tmp_path / "run" / "stream")
    _commit(store, 1, 1.0)
    real_read, reads = ChunkStore.read, [0]

    def read_while_training(self: ChunkStore, record: PartRecord, **options: Any) -> dict:
        reads[0] += 1
        if reads[0] == 1:  # the run commits step 2 between the manifest and the file reads
            _commit(store, 2, 2.0)
            store.drop_spares()
        return real_read(self, record, **options)

    monkeypatch.setattr(ChunkStore, "read", read_while_training)
    info, state = committed_checkpoint(config, tmp_path / "run")
    assert info.step == 2 and torch.equal(state["model"]["weight"], torch.full((64, 64), 2.0))
    # A file that does not match an unchanged manifest is damage, not a race.
    (store.root / "c0000-lin.w.v00000002.safetensors").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        committed_checkpoint(config, tmp_path / "run")
