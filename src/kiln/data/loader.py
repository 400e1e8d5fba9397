"""Stateful loader of packed fixed-length windows with exact, elastic resume.

Window ``i`` holds tokens ``[i * seq_len, i * seq_len + seq_len + 1)``: inputs are the first
``seq_len`` and targets the last ``seq_len``, so neighbouring windows share one token. An epoch
is a permutation of the windows (identity, or PCG64 seeded from ``(seed, epoch)``). Each step
consumes ``samples_per_step * world_size`` consecutive positions of that order; rank ``r`` takes
its slice. When fewer positions than one step remain, they are dropped (at most one step less one
window) and the next epoch begins. Everything a batch holds is a pure function of
(epoch, position), which is all the state there is: prefetching cannot change results, and a
state saved under one world size resumes under another at the same global position.

An optional transform turns each window into named arrays (for example the per-token loss
weights of ``data/objectives.py``); it is called with the window's epoch and id, so it too can
be a pure function of the cursor.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from kiln.errors import DataError

# (window, epoch, window id) -> named arrays of one sample.
WindowTransform = Callable[[np.ndarray, int, int], dict[str, np.ndarray]]
Batch = torch.Tensor | dict[str, torch.Tensor]


class Stream(Protocol):
    """A token sequence read by ranges: a shard stream or an in-memory array."""

    def __len__(self) -> int: ...

    def read(self, start: int, length: int) -> np.ndarray: ...

# Fields that identify the window sequence: a checkpoint is only valid for the same ones.
# ``data`` (the stream's content id) is absent from checkpoints of older versions: not checked.
_IDENTITY = ("seq_len", "num_windows", "seed", "shuffle", "data")


def _short(value: Any) -> Any:
    """A content id cut to 16 characters (as token cache folders are named); others as is."""
    return value[:16] if isinstance(value, str) else value


@dataclass
class _Batch:
    ids: list[int]
    samples: Batch
    epoch: int  # cursor after this batch
    position: int


@dataclass(eq=False)
class _Schedule:
    """Which windows a rank gets at each (epoch, position), and their tokens."""

    stream: Stream
    transform: WindowTransform | None
    seq_len: int
    num_windows: int
    shuffle: bool
    seed: int
    group: int  # windows per step over all ranks
    lo: int  # this rank's slice of a step's positions
    hi: int
    _order: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's window order (cached: consecutive batches share an epoch)."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                order = rng.permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, epoch: int, position: int) -> _Batch:
        """The batch that starts at (epoch, position), and the cursor after it."""
        if position + self.group > self.num_windows:  # drop the epoch's short remainder
            epoch, position = epoch + 1, 0
        ids = self.order(epoch)[position + self.lo : position + self.hi].tolist()
        rows = [self.stream.read(i * self.seq_len, self.seq_len + 1) for i in ids]
        if self.transform is None:
            samples: Batch = torch.from_numpy(np.stack(rows))
        else:
            parts = [self.transform(row, epoch, i) for row, i in zip(rows, ids, strict=True)]
            samples = {k: torch.from_numpy(np.stack([p[k] for p in parts])) for k in parts[0]}
        return _Batch(ids, samples, epoch, position + self.group)


class _Prefetcher:
    """A thread computing the batches after a cursor, in order, into a bounded queue.

    It holds no reference to the loader, so a loader dropped without ``close`` can still be
    collected (its finalizer stops the thread).
    """

    def __init__(self, schedule: _Schedule, epoch: int, position: int, depth: int) -> None:
        self._queue: queue.Queue[_Batch | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(schedule, epoch, position), name="kiln-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, schedule: _Schedule, epoch: int, position: int) -> None:
        try:
            while not self._stop.is_set():
                batch = schedule.batch(epoch, position)
                epoch, position = batch.epoch, batch.position
                self._queue.put(batch)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._queue.put(exc)

    def get(self) -> _Batch:
        """The next batch; re-raises an error the thread hit."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """Stop and join the thread."""
        self._stop.set()
        # Emptying the queue unblocks a pending put; the thread then sees the flag and exits.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


class WindowLoader:
    """Batches of ``samples_per_step`` windows of ``seq_len + 1`` tokens for one rank."""

    def __init__(
        self,
        stream: Stream,
        *,
        seq_len: int,
        samples_per_step: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool,
        seed: int,
        prefetch: int = 2,
        transform: WindowTransform | None = None,
        source: str = "the token stream",
        data_id: str | None = None,
    ) -> None:
        """``source`` names the stream in errors (the code corpus, the CoT records, ...).

        ``data_id`` identifies the stream's content (a token cache key): a saved state only
        loads into a loader of the same content, so a resume never trains on changed data.
        """
        if seq_len < 1 or samples_per_step < 1 or prefetch < 0 or seed < 0:
            raise ValueError("seq_len and samples_per_step must be >= 1, prefetch and seed >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        num_windows = max(len(stream) - 1, 0) // seq_len
        group = samples_per_step * world_size
        if num_windows < group:
            raise DataError(
                f"{source} has {len(stream):,} tokens, {num_windows} windows of "
                f"seq_len {seq_len}; one step needs {group} windows ({group * seq_len + 1:,} "
                "tokens); add data or lower seq_len, the batch size or the number of processes"
            )
        self._schedule = _Schedule(
            stream=stream,
            transform=transform,
            seq_len=seq_len,
            num_windows=num_windows,
            shuffle=shuffle,
            seed=seed,
            group=group,
            lo=rank * samples_per_step,
            hi=(rank + 1) * samples_per_step,
        )
        self._data_id = data_id
        self._source = source
        self._prefetch = prefetch
        self._prefetcher: _Prefetcher | None = None
        self._stop_prefetcher: weakref.finalize | None = None
        self._closed = False
        self.epoch = 0
        self.position = 0  # windows of the current epoch consumed, over all ranks
        self.windows_consumed = 0  # over all epochs and ranks
        self.last_batch_window_ids: list[int] = []

    @property
    def num_windows(self) -> int:
        """Windows in one epoch."""
        return self._schedule.num_windows

    def next_batch(self) -> Batch:
        """The next ``[samples_per_step, seq_len + 1]`` int64 batch of this rank.

        With a transform, a dict of its arrays stacked over the batch's windows.
        """
        if self._closed:
            raise RuntimeError("WindowLoader is closed")
        if self._prefetch == 0:
            batch = self._schedule.batch(self.epoch, self.position)
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(
                    self._schedule, self.epoch, self.position, self._prefetch
                )
                self._stop_prefetcher = weakref.finalize(self, self._prefetcher.stop)
            try:
                batch = self._prefetcher.get()
            except BaseException:
                self._halt()  # the thread is finished or unusable; a retry starts a fresh one
                raise
        self.epoch, self.position = batch.epoch, batch.position
        self.windows_consumed += self._schedule.group
        self.last_batch_window_ids = batch.ids
        return batch.samples

    def state_dict(self) -> dict[str, Any]:
        """What was handed out so far (never what was prefetched) and what it applies to."""
        schedule = self._schedule
        return {
            "epoch": self.epoch,
            "position": self.position,
            "windows_consumed": self.windows_consumed,
            "seq_len": schedule.seq_len,
            "num_windows": schedule.num_windows,
            "seed": schedule.seed,
            "shuffle": schedule.shuffle,
            "data": self._data_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; world size and samples per step may differ from its run's."""
        mine = self.state_dict()
        changed = [
            f"{k}: saved {_short(state.get(k))!r}, now {_short(mine[k])!r}"
            for k in _IDENTITY
            if state.get(k) != mine[k] and not (k == "data" and state.get(k) is None)
        ]
        if changed:
            raise DataError(
                f"the checkpoint's data loader state for {self._source} does not fit this data ("
                + ", ".join(changed)
                + "): the token data or data settings changed since it was saved; "
                "restore them or start a new run"
            )
        try:
            epoch, position, consumed = (
                int(state["epoch"]),
                int(state["position"]),
                int(state["windows_consumed"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"the checkpoint's data loader state is malformed ({exc})") from exc
        if epoch < 0 or consumed < 0 or not 0 <= position <= self.num_windows:
            raise DataError(f"the checkpoint's data loader state is out of range: {state}")
        self._halt()
        self.epoch, self.position, self.windows_consumed = epoch, position, consumed
        self.last_batch_window_ids = []

    def _halt(self) -> None:
        if self._stop_prefetcher is not None:
            self._stop_prefetcher()  # runs stop() once and detaches the finalizer
        self._prefetcher = self._stop_prefetcher = None

    def close(self) -> None:
        """Stop the prefetch thread; the loader cannot be used afterwards."""
        self._halt()
        self._closed = True

    def __enter__(self) -> WindowLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
