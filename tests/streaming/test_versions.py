"""The version table: version 0, commits in the background, a failed write, rollback, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.errors import CheckpointError
from kiln.streaming.cache import ChunkCache, IOStats
from kiln.streaming.chunks import build_plan
from kiln.streaming.store import ChunkStore, PartRecord
from kiln.streaming.versions import WEIGHTS, ChunkVersions


def _versions(tmp_path: Path) -> ChunkVersions:
    torch.manual_seed(0)
    plan = build_plan(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    return ChunkVersions(ChunkStore(tmp_path), plan)


def test_a_commit_names_the_durable_versions_and_resume_finds_them(tmp_path: Path) -> None:
    versions = _versions(tmp_path)
    versions.initialize()
    versions.commit(0, {"step": 0}, {}, cache=None)  # before any step: at once
    cache = ChunkCache(versions.store, capacity=1 << 20, stats=IOStats())
    weights = cache.get((0, WEIGHTS), versions.record(0, WEIGHTS))
    next(iter(weights.values())).add_(1.0)
    cache.write_behind((0, WEIGHTS), "0", 1, versions.written(0, WEIGHTS))
    versions.commit(1, {"step": 1}, {}, cache)  # after the write, on the writer thread
    versions.flush()
    cache.close()
    assert versions.record(0, WEIGHTS).version == 1
    versions.store.unlock()  # the process ends
    again = _versions(tmp_path)
    assert again.resume() == {"step": 1}
    assert [again.record(j, WEIGHTS) for j in (0, 1)] == [
        versions.record(j, WEIGHTS) for j in (0, 1)
    ]


def test_a_failed_write_stops_the_commit_and_rollback_returns_to_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions = _versions(tmp_path)
    versions.initialize()
    versions.commit(0, {"step": 0}, {}, cache=None)
    committed = versions.record(0, WEIGHTS)
    cache = ChunkCache(versions.store, capacity=1 << 20, stats=IOStats())
    for j in (0, 1):
        cache.get((j, WEIGHTS), versions.record(j, WEIGHTS))
    cache.write_behind((0, WEIGHTS), "0", 1, versions.written(0, WEIGHTS))
    real_write = versions.store.write

    def broken(chunk: int, *args: object) -> PartRecord:
        if chunk == 1:
            raise OSError("disk went away")
        return real_write(chunk, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(versions.store, "write", broken)
    cache.write_behind((1, WEIGHTS), "1", 1, versions.written(1, WEIGHTS))
    versions.commit(1, {"step": 1}, {}, cache)
    with pytest.raises(OSError, match="disk went away"):
        versions.flush()
    assert versions.record(0, WEIGHTS).version == 1  # durable, but never committed
    cache.clear()
    versions.rollback()
    assert versions.record(0, WEIGHTS) == committed
    versions.store.unlock()  # the process ends
    assert _versions(tmp_path).resume() == {"step": 0}
    cache.close()


def test_a_store_another_process_holds_is_refused(tmp_path: Path) -> None:
    # Two runs with one run id (a copied run directory) and one strategy.store_dir.
    first = _versions(tmp_path)
    first.initialize()
    first.commit(0, {"step": 0}, {}, cache=None)
    second = _versions(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=rf"the chunk store {tmp_path} is in use by another "
        r"kiln process.*Wait for the other to end",
    ):
        second.resume()
    with pytest.raises(CheckpointError, match="is in use by another kiln process"):
        second.initialize()
    assert first.resume() == {"step": 0}  # its files are untouched
    first.store.unlock()
    assert second.resume() == {"step": 0}
