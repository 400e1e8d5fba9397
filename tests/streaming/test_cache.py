"""The resident cache: LRU under a byte capacity, pins, prefetch, write-behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.streaming import cache as cache_module
from kiln.streaming.cache import ChunkCache, IOStats
from kiln.streaming.store import ChunkStore, PartRecord

MB = 1 << 20


def _store(tmp_path: Path, chunks: int) -> tuple[ChunkStore, list[PartRecord]]:
    store = ChunkStore(tmp_path)
    records = [
        store.write(i, f"c{i}", "w", 0, {"x": torch.full((MB // 4,), float(i))})
        for i in range(chunks)
    ]
    return store, records


def test_lru_eviction_keeps_within_capacity_and_counts_hits(tmp_path: Path) -> None:
    store, records = _store(tmp_path, 4)
    stats = IOStats()
    cache = ChunkCache(store, capacity=int(2.5 * MB), stats=stats)
    for i in (0, 1, 2):
        assert cache.get((i, "w"), records[i])["x"][0] == i
        cache.unpin((i, "w"))
        assert cache.resident <= 2.5 * MB
    assert (stats.misses, stats.hits) == (3, 0)
    cache.get((2, "w"), records[2])  # resident: a hit
    cache.unpin((2, "w"))
    cache.get((0, "w"), records[0])  # evicted as least recently used: a miss
    assert (stats.misses, stats.hits) == (4, 1)
    assert stats.bytes_read == sum(records[i].nbytes for i in (0, 1, 2, 0))
    cache.close()


def test_an_evicted_parts_buffer_is_reused_only_when_nothing_else_views_it(
    tmp_path: Path,
) -> None:
    store, records = _store(tmp_path, 4)
    cache = ChunkCache(store, capacity=int(2.5 * MB), stats=IOStats())

    def read(i: int) -> dict[str, torch.Tensor]:
        tensors = cache.get((i, "w"), records[i])
        cache.unpin((i, "w"))
        return tensors

    first = read(0)["x"].untyped_storage().data_ptr()
    read(1)
    third = read(2)["x"].untyped_storage().data_ptr()  # evicts part 0: its buffer is reused
    assert third == first
    kept = read(3)["x"]  # a view that outlives the part's eviction
    read(0)
    read(1)  # evicts 2 (reused by 1), then 3, whose buffer is still viewed: a fresh one
    assert kept.untyped_storage().data_ptr() not in {
        cache._entries[k].tensors["x"].untyped_storage().data_ptr() for k in cache._entries
    }
    assert torch.equal(kept, torch.full((MB // 4,), 3.0))
    assert read(0)["x"][0] == 0 and read(1)["x"][0] == 1
    cache.close()


def test_io_busy_time_is_the_union_of_overlapping_io_within_the_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]
    monkeypatch.setattr(cache_module.time, "perf_counter", lambda: clock[0])

    def at(t: float) -> None:
        clock[0] = t

    stats = IOStats()
    stats.reset(0)
    read, write, late = stats.io(), stats.io(), stats.io()
    at(1), read.__enter__()
    at(2), write.__enter__()
    at(3), read.__exit__(None, None, None)
    at(5), write.__exit__(None, None, None)  # busy 1..5 once, not 1..3 plus 2..5
    at(6), late.__enter__()
    at(7)
    assert stats.io_busy() == 5.0  # 4 closed plus the 1 s of the write still running
    stats.reset(0)  # a new step while that write runs: it counts from here
    at(9), late.__exit__(None, None, None)
    assert stats.io_busy() == 2.0


def test_pinned_parts_are_not_evicted(tmp_path: Path) -> None:
    store, records = _store(tmp_path, 3)
    cache = ChunkCache(store, capacity=MB + MB // 2, stats=IOStats())
    first = cache.get((0, "w"), records[0])
    cache.get((1, "w"), records[1])  # over capacity, but 0 is pinned
    assert (0, "w") in cache._entries and first["x"][0] == 0
    cache.close()


def test_prefetch_reads_in_the_background_and_get_counts_a_hit(tmp_path: Path) -> None:
    store, records = _store(tmp_path, 2)
    stats = IOStats()
    cache = ChunkCache(store, capacity=4 * MB, stats=stats)
    cache.prefetch((1, "w"), records[1])
    assert cache.get((1, "w"), records[1])["x"][0] == 1
    assert (stats.hits, stats.misses) == (1, 0)
    cache.prefetch((0, "w"), None)  # never written: nothing to read
    assert cache.get((0, "w"), None) == {}
    cache.close()


def test_write_behind_is_durable_after_wait(tmp_path: Path) -> None:
    store, records = _store(tmp_path, 1)
    stats = IOStats()
    cache = ChunkCache(store, capacity=4 * MB, stats=stats)
    tensors = cache.get((0, "w"), records[0])
    tensors["x"].add_(1.0)
    written: list[PartRecord] = []
    cache.write_behind((0, "w"), "c0", 1, written.append)
    cache.wait_write((0, "w"))
    (record,) = written
    assert record.version == 1 and stats.bytes_written == record.nbytes
    assert torch.equal(store.read(record)["x"], torch.full((MB // 4,), 1.0))
    assert torch.equal(store.read(records[0])["x"], torch.zeros(MB // 4))  # old version intact
    cache.close()


def test_a_task_after_writes_runs_once_they_are_durable_and_never_after_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, records = _store(tmp_path, 2)
    cache = ChunkCache(store, capacity=4 * MB, stats=IOStats())
    for i in (0, 1):
        cache.get((i, "w"), records[i])
    written: list[PartRecord] = []
    cache.write_behind((0, "w"), "c0", 1, written.append)
    seen: list[int] = []
    cache.after_writes(lambda: seen.append(len(written))).result()
    assert seen == [1]  # the write before it was done

    def broken(*_args: object) -> PartRecord:
        raise OSError("disk went away")

    monkeypatch.setattr(store, "write", broken)
    cache.write_behind((1, "w"), "c1", 1, written.append)
    task = cache.after_writes(lambda: seen.append(-1))
    with pytest.raises(OSError, match="disk went away"):
        task.result()
    with pytest.raises(OSError, match="disk went away"):
        cache.after_writes(lambda: seen.append(-1)).result()  # nor any later one
    assert seen == [1] and len(written) == 1
    cache.clear()  # a failed step is abandoned: later tasks run again
    cache.after_writes(lambda: seen.append(2)).result()
    assert seen == [1, 2]
    cache.close()
