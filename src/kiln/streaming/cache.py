"""Resident chunk parts under a byte budget, with background prefetch and write-behind.

Parts are cached by key (chunk index, part). Eviction is least-recently-used, never of a pinned
part (one the step is computing with) and never of a part whose write is still in flight
before that write is done. The executor knows the order in which it will visit chunks and
calls ``prefetch`` for the next ones while the current one computes; a read runs on a
background thread and ``get`` waits for it. ``write_behind`` hands a new version to a writer
thread; ``wait_writes`` blocks until every one of them is durable (before the step commits).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kiln.streaming.store import ChunkStore, PartRecord

Key = tuple[int, str]
Tensors = dict[str, torch.Tensor]


def tensors_nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class IOStats:
    """Counters of one step (``reset`` at its start); read/write bytes are file bytes."""

    bytes_read: int = 0
    bytes_written: int = 0
    hits: int = 0
    misses: int = 0
    io_wait: float = 0.0
    peak_resident: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self, resident: int) -> None:
        with self.lock:
            self.bytes_read = self.bytes_written = self.hits = self.misses = 0
            self.io_wait = 0.0
            self.peak_resident = resident

    def add(self, *, read: int = 0, written: int = 0) -> None:
        with self.lock:
            self.bytes_read += read
            self.bytes_written += written


@dataclass
class _Entry:
    tensors: Tensors
    nbytes: int
    write: Future[PartRecord] | None = None


class ChunkCache:
    """Chunk parts held in memory, at most ``capacity`` bytes of them (plus pinned ones)."""

    def __init__(self, store: ChunkStore, capacity: int, stats: IOStats) -> None:
        self.store = store
        self.capacity = capacity
        self.stats = stats
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._reads: dict[Key, tuple[Future[Tensors], int]] = {}
        self._writes: dict[Key, Future[PartRecord]] = {}
        self._pinned: set[Key] = set()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kiln-stream-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kiln-stream-write")

    # ------------------------------------------------------------------ accounting

    @property
    def resident(self) -> int:
        """Bytes of cached parts plus reads in flight (their buffers are allocated)."""
        return sum(e.nbytes for e in self._entries.values()) + sum(
            n for _, n in self._reads.values()
        )

    def _note_resident(self) -> None:
        self.stats.peak_resident = max(self.stats.peak_resident, self.resident)

    def make_room(self, nbytes: int) -> bool:
        """Evict LRU parts until ``nbytes`` more fit; False if pinned parts prevent it."""
        for key in list(self._entries):
            if self.resident + nbytes <= self.capacity:
                break
            if key in self._pinned:
                continue
            entry = self._entries.pop(key)
            if entry.write is not None:
                entry.write.result()
        return self.resident + nbytes <= self.capacity

    # ------------------------------------------------------------------ reads

    def _read(self, record: PartRecord) -> Tensors:
        tensors = self.store.read(record)
        self.stats.add(read=record.nbytes)
        return tensors

    def prefetch(self, key: Key, record: PartRecord | None) -> None:
        """Start reading a part in the background if it is not resident and fits."""
        if record is None or key in self._entries or key in self._reads:
            return
        if self.make_room(record.nbytes):
            self._reads[key] = (self._reader.submit(self._read, record), record.nbytes)
            self._note_resident()

    def get(self, key: Key, record: PartRecord | None) -> Tensors:
        """The part's tensors (empty for a part never written), pinned until ``unpin``."""
        self._pinned.add(key)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return self._entries[key].tensors
        if record is None:
            return self.put(key, {})
        started = time.perf_counter()
        if key in self._reads:
            future, _ = self._reads[key]
            tensors = future.result()
            del self._reads[key]
            self.stats.hits += 1
        else:
            self.make_room(record.nbytes)
            tensors = self._read(record)
            self.stats.misses += 1
        self.stats.io_wait += time.perf_counter() - started
        return self.put(key, tensors)

    def put(self, key: Key, tensors: Tensors) -> Tensors:
        """Make ``tensors`` the resident copy of ``key`` (pinned parts may exceed capacity)."""
        nbytes = tensors_nbytes(tensors)
        self._entries.pop(key, None)
        self.make_room(nbytes)
        self._entries[key] = _Entry(tensors, nbytes)
        self._note_resident()
        return tensors

    def unpin(self, key: Key) -> None:
        self._pinned.discard(key)

    # ------------------------------------------------------------------ writes

    def write_behind(self, key: Key, name: str, version: int) -> None:
        """Write the resident copy of ``key`` as ``version`` in the background.

        The tensors must not change until ``wait_writes`` returns.
        """
        entry = self._entries[key]
        entry.nbytes = tensors_nbytes(entry.tensors)
        chunk, part = key

        def write() -> PartRecord:
            record = self.store.write(chunk, name, part, version, entry.tensors)
            self.stats.add(written=record.nbytes)
            return record

        entry.write = self._writer.submit(write)
        self._writes[key] = entry.write
        self._note_resident()

    def wait_writes(self) -> dict[Key, PartRecord]:
        """Block until every pending write is durable; their records by key."""
        started = time.perf_counter()
        done = {key: future.result() for key, future in self._writes.items()}
        self.stats.io_wait += time.perf_counter() - started
        self._writes.clear()
        for entry in self._entries.values():
            entry.write = None
        return done

    def clear(self) -> None:
        """Forget everything (after a failed step: resident copies may be half updated)."""
        for future, _ in self._reads.values():
            future.cancel()
        for future in self._writes.values():
            future.exception()
        self._reads.clear()
        self._writes.clear()
        self._entries.clear()
        self._pinned.clear()

    def close(self) -> None:
        self.clear()
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
