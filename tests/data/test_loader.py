"""WindowLoader: packing, shuffling, sharding across ranks, exact resume and prefetching."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.data.loader import WindowLoader
from kiln.data.shards import TokenStream
from kiln.errors import DataError


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    yield
    gc.collect()
    assert not [t for t in threading.enumerate() if t.name == "kiln-prefetch"]


def _stream(folder: Path, num_tokens: int, shard_tokens: int = 23) -> TokenStream:
    """Tokens 0, 1, 2, ... in shards of ``shard_tokens``: a window's content names its place."""
    tokens = np.arange(num_tokens, dtype="<u2")
    shards = []
    for i, start in enumerate(range(0, num_tokens, shard_tokens)):
        name = f"train_{i:05d}.bin"
        tokens[start : start + shard_tokens].tofile(folder / name)
        shards.append({"file": name, "num_tokens": len(tokens[start : start + shard_tokens])})
    return TokenStream(folder, shards, np.dtype("<u2"))


def _loader(stream: TokenStream, **kw) -> WindowLoader:
    args = dict(seq_len=8, samples_per_step=3, shuffle=True, seed=1, prefetch=2)
    args.update(kw)
    return WindowLoader(stream, **args)


def _ids(loader: WindowLoader, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        loader.next_batch()
        out.append(loader.last_batch_window_ids)
    return out


def _batches(loader: WindowLoader, steps: int) -> list[torch.Tensor]:
    return [loader.next_batch() for _ in range(steps)]


def test_windows_are_packed_and_shifted(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 100)  # 99 // 8 = 12 windows
    with _loader(stream, shuffle=False) as loader:
        assert loader.num_windows == 12
        for step in range(4):
            batch = loader.next_batch()
            assert batch.shape == (3, 9) and batch.dtype == torch.int64
            assert loader.last_batch_window_ids == [3 * step, 3 * step + 1, 3 * step + 2]
            for row, window in zip(batch, loader.last_batch_window_ids, strict=True):
                assert row.tolist() == list(range(8 * window, 8 * window + 9))  # across shards
            inputs, targets = batch[:, :-1], batch[:, 1:]
            assert torch.equal(targets, inputs + 1)
        assert loader.next_batch()[0, 0].item() == 0  # epoch 2 starts over
        assert loader.state_dict()["epoch"] == 1


def test_shuffle_covers_each_window_once_per_epoch(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 8 * 40 + 1)  # 40 windows, 3 per step: 13 steps, 1 dropped
    with _loader(stream) as loader:
        epochs = [[w for ids in _ids(loader, 13) for w in ids] for _ in range(3)]
        state = loader.state_dict()
    for ids in epochs:
        assert len(ids) == len(set(ids)) == 39 and set(ids) <= set(range(40))
        assert ids != sorted(ids)
    assert epochs[0] != epochs[1] != epochs[2]
    assert state["epoch"] == 2 and state["position"] == 39 and state["windows_consumed"] == 117


def test_same_seed_same_order_other_seed_other_order(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 400)
    with _loader(stream) as a, _loader(stream) as b, _loader(stream, seed=2) as c:
        first = _ids(a, 5)
        assert _ids(b, 5) == first
        assert _ids(c, 5) != first


def test_ranks_partition_the_global_order(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 8 * 30 + 1)  # 30 windows, 4 per step: 7 steps, 2 dropped
    with _loader(stream, samples_per_step=4, world_size=1) as single:
        reference = _ids(single, 16)
    with (
        _loader(stream, samples_per_step=2, rank=0, world_size=2) as r0,
        _loader(stream, samples_per_step=2, rank=1, world_size=2) as r1,
    ):
        for expected in reference:
            a, b = _ids(r0, 1)[0], _ids(r1, 1)[0]
            assert not set(a) & set(b)
            assert a + b == expected


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("k", [0, 1, 4, 6, 7, 9])
def test_resume_after_k_batches_is_exact(tmp_path: Path, prefetch: int, k: int) -> None:
    stream = _stream(tmp_path, 8 * 20 + 1)  # 20 windows, 3 per step: 6 steps an epoch
    with _loader(stream, prefetch=prefetch) as reference:
        expected = _batches(reference, k + 8)
    with _loader(stream, prefetch=prefetch) as first:
        assert all(torch.equal(a, b) for a, b in zip(_batches(first, k), expected, strict=False))
        state = first.state_dict()
    assert state["windows_consumed"] == 3 * k  # what was handed out, not what was prefetched
    with _loader(stream, prefetch=2) as resumed:
        resumed.load_state_dict(state)
        for want, got in zip(expected[k:], _batches(resumed, 8), strict=True):
            assert torch.equal(want, got)
        assert resumed.state_dict()["windows_consumed"] == 3 * (k + 8)


def test_load_state_in_the_middle_of_prefetching(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 300)
    with _loader(stream, prefetch=4) as loader:
        expected = _ids(loader, 12)
    with _loader(stream, prefetch=4) as loader:
        _ids(loader, 5)
        state_after_5 = loader.state_dict()
        _ids(loader, 3)  # the thread has run ahead; loading must discard its batches
        loader.load_state_dict(state_after_5)
        assert _ids(loader, 7) == expected[5:]


def test_elastic_resume_keeps_the_global_order(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 8 * 30 + 1)
    with _loader(stream, samples_per_step=4) as single:
        reference = _ids(single, 14)
    with _loader(stream, samples_per_step=4) as before:
        _ids(before, 5)
        state = before.state_dict()
    with (
        _loader(stream, samples_per_step=2, rank=0, world_size=2) as r0,
        _loader(stream, samples_per_step=2, rank=1, world_size=2) as r1,
    ):
        r0.load_state_dict(state)
        r1.load_state_dict(state)
        for expected in reference[5:]:
            assert _ids(r0, 1)[0] + _ids(r1, 1)[0] == expected


def test_prefetch_does_not_change_batches(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 250)
    with _loader(stream, prefetch=0) as sync, _loader(stream, prefetch=5) as ahead:
        for a, b in zip(_batches(sync, 25), _batches(ahead, 25), strict=True):
            assert torch.equal(a, b)


def test_state_from_other_data_is_rejected(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 200)
    with _loader(stream) as loader:
        loader.next_batch()
        state = loader.state_dict()
    for change in ({"seq_len": 16}, {"shuffle": False}, {"seed": 9}):
        with _loader(stream, **change) as other, pytest.raises(DataError, match="changed since"):
            other.load_state_dict(state)
    (tmp_path / "more").mkdir()
    with _loader(_stream(tmp_path / "more", 300)) as bigger:
        with pytest.raises(DataError, match="num_windows: saved 24, now 37"):
            bigger.load_state_dict(state)
        with pytest.raises(DataError, match="malformed"):
            bigger.load_state_dict({**bigger.state_dict(), "position": None})


def test_state_from_other_content_of_the_same_size_is_rejected(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 200)
    with _loader(stream, data_id="a" * 64, source="the code corpus") as loader:
        loader.next_batch()
        state = loader.state_dict()
    # Same length, so the same number of windows: only the content id tells the data apart.
    edited = _loader(stream, data_id="b" * 64, source="the code corpus")
    with edited, pytest.raises(DataError, match=r"for the code corpus .*data: saved 'a{16}', now"):
        edited.load_state_dict(state)
    with _loader(stream, data_id="a" * 64) as same:
        same.load_state_dict(state)
        assert same.position == 3
    legacy = {k: v for k, v in state.items() if k != "data"}  # a checkpoint from before the id
    with _loader(stream, data_id="b" * 64) as edited:
        edited.load_state_dict(legacy)
        assert edited.position == 3


def test_too_little_data(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 40)  # 4 windows of 8
    with pytest.raises(DataError, match=r"has 40 tokens, 4 windows .* needs 6 windows \(49 tokens"):
        _loader(stream, world_size=2)
    with _loader(stream, samples_per_step=4, prefetch=0) as loader:
        assert loader.next_batch().shape == (4, 9)


def test_errors_from_the_prefetch_thread_reach_the_caller(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 200)
    (tmp_path / "train_00003.bin").unlink()  # tokens 69..91, opened lazily by the thread
    with _loader(stream, shuffle=False, samples_per_step=1) as loader:
        assert [loader.next_batch()[0, 0].item() for _ in range(8)] == list(range(0, 64, 8))
        with pytest.raises(FileNotFoundError):
            loader.next_batch()  # window 8 = tokens 64..72
        assert loader.state_dict()["position"] == 8  # the failed batch was not counted
        with pytest.raises(FileNotFoundError):
            loader.next_batch()  # a retry fails the same way, from a fresh thread


def test_close_and_garbage_collection_stop_the_thread(tmp_path: Path) -> None:
    stream = _stream(tmp_path, 200)
    loader = _loader(stream)
    loader.next_batch()
    loader.close()
    assert not [t for t in threading.enumerate() if t.name == "kiln-prefetch"]
    with pytest.raises(RuntimeError, match="closed"):
        loader.next_batch()
    dropped = _loader(stream, prefetch=1)
    dropped.next_batch()
    del dropped  # never closed: the finalizer stops the thread (checked by the fixture)
