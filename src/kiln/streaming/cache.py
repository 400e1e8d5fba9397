"""Resident chunk parts under a byte budget, with background prefetch and write-behind.

Parts are cached by key (chunk index, part). Eviction is least-recently-used, never of a pinned
part (one the step is computing with) and never of a part whose write is still in flight
before that write is done. The executor knows the order in which it will visit chunks and
calls ``prefetch`` for the next ones while the current one computes; a read runs on a
background thread and ``get`` waits for it. ``write_behind`` hands a new version to the one
writer thread, which works in submission order, so a task queued with ``after_writes`` (the
step's commit) runs once every write before it is durable. A part's tensors must not change
while its write is in flight: ``wait_write`` waits for it.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kiln.streaming.memory import mapped_empty
from kiln.streaming.store import (
    ChunkStore,
    PartRecord,
    as_image,
    image_size,
    part_nbytes,
)

Key = tuple[int, str]
Tensors = dict[str, torch.Tensor]


def tensors_nbytes(tensors: Tensors) -> int:
    """Bytes of the memory ``tensors`` occupy: their storages, each counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors.values()}
    return sum(storage.nbytes() for storage in storages.values())


@dataclass
class IOStats:
    """Counters of one step (``reset`` at its start).

    Read and write bytes are file bytes; a write counts when it is issued (it may finish during
    the next step). I/O busy time is the part of the step in which at least one read or write
    (with its checksum) was in progress; the rest of the step had no I/O running.
    """

    bytes_read: int = 0
    bytes_written: int = 0
    hits: int = 0
    misses: int = 0
    io_wait: float = 0.0
    peak_resident: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _busy: float = field(default=0.0, init=False, repr=False)  # closed busy spans of the step
    _in_flight: int = field(default=0, init=False, repr=False)
    _busy_since: float = field(default=0.0, init=False, repr=False)

    def reset(self, resident: int) -> None:
        with self.lock:
            self.bytes_read = self.bytes_written = self.hits = self.misses = 0
            self.io_wait = self._busy = 0.0
            self._busy_since = time.perf_counter()  # I/O still running counts from here
            self.peak_resident = resident

    @contextmanager
    def io(self) -> Iterator[None]:
        """Mark a read or write in progress (on whichever thread does it)."""
        with self.lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        try:
            yield
        finally:
            with self.lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._busy += time.perf_counter() - self._busy_since

    def io_busy(self) -> float:
        """Seconds of this step so far with I/O in progress."""
        with self.lock:
            running = time.perf_counter() - self._busy_since if self._in_flight else 0.0
            return self._busy + running

    def add(self, *, read: int = 0, written: int = 0) -> None:
        with self.lock:
            self.bytes_read += read
            self.bytes_written += written


@dataclass
class _Entry:
    tensors: Tensors
    nbytes: int


class _BufferProbe:
    """Whether the one buffer a part's tensors view is free for reuse once the part is gone.

    A reused buffer is overwritten by the next read, so nothing may still see it: no Python
    reference to the part's tensors (weak references tell) and no other tensor on its storage
    (the storage's use count tells; torch has no public accessor for it, and without one
    nothing is reused).
    """

    def __init__(self, tensors: Tensors) -> None:
        first = next(iter(tensors.values()), None)
        self.storage = None if first is None else first.untyped_storage()
        shared = self.storage is not None and all(
            t.untyped_storage().data_ptr() == self.storage.data_ptr() for t in tensors.values()
        )
        self.refs = [weakref.ref(t) for t in tensors.values()] if shared else None

    def free_buffer(self) -> torch.Tensor | None:
        """The buffer as a flat uint8 tensor if nothing else uses it, else None."""
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if use_count is None or self.storage is None or self.refs is None:
            return None
        if any(ref() is not None for ref in self.refs):
            return None
        if use_count(self.storage._cdata) != 1:  # this probe's wrapper alone
            return None
        return torch.empty(0, dtype=torch.uint8).set_(self.storage)


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
        self._failure: BaseException | None = None  # of a write: later commits must not run
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kiln-stream-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kiln-stream-write")
        # Buffers of evicted parts by size, reused by reads: fresh pages cost a fault each.
        self._spare: dict[int, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ accounting

    @property
    def resident(self) -> int:
        """Bytes of cached parts, reads in flight and spare buffers."""
        return (
            sum(e.nbytes for e in self._entries.values())
            + sum(n for _, n in self._reads.values())
            + sum(b.numel() for spares in self._spare.values() for b in spares)
        )

    def _note_resident(self) -> None:
        self.stats.peak_resident = max(self.stats.peak_resident, self.resident)

    def make_room(self, nbytes: int) -> bool:
        """Free spare buffers, then evict LRU parts, until ``nbytes`` more fit.

        False if pinned parts prevent it.
        """
        while self.resident + nbytes > self.capacity:
            if not (self._drop_spare() or self._evict()):
                return False
        return True

    def _evict(self) -> bool:
        """Evict the least recently used unpinned part (its buffer kept as a spare)."""
        key = next((k for k in self._entries if k not in self._pinned), None)
        if key is None:
            return False
        self.wait_write(key)
        probe = _BufferProbe(self._entries.pop(key).tensors)  # the entry is gone after this
        buffer = probe.free_buffer()
        if buffer is not None:
            self._spare.setdefault(buffer.numel(), []).append(buffer)
        return True

    def _drop_spare(self, keep: int = -1) -> bool:
        """Free one spare buffer of a size other than ``keep``."""
        for size, spares in self._spare.items():
            if size != keep and spares:
                spares.pop()
                return True
        return False

    def _buffer_for(self, nbytes: int, *, must: bool) -> torch.Tensor | None:
        """A buffer for reading an ``nbytes`` part: a spare one if any, else a new one that
        fits (after evictions); None if it cannot fit, unless ``must``."""
        size = image_size(nbytes)
        while True:
            # A spare up to twice the size serves too: reusing beats unmapping one and mapping
            # another (the cache counts the whole buffer).
            fitting = [n for n, spares in self._spare.items() if spares and size <= n <= 2 * size]
            if fitting:
                return self._spare[min(fitting)].pop()
            if self.resident + size <= self.capacity:
                break
            if not (self._drop_spare(keep=size) or self._evict()):
                if not must:
                    return None
                break
        return mapped_empty(size)

    # ------------------------------------------------------------------ reads

    def _read(self, record: PartRecord, buffer: torch.Tensor) -> Tensors:
        with self.stats.io():
            tensors = self.store.read(record, into=buffer)
        self.stats.add(read=record.nbytes)
        return tensors

    def prefetch(self, key: Key, record: PartRecord | None) -> None:
        """Start reading a part in the background if it is not resident and fits."""
        if record is None or key in self._entries or key in self._reads:
            return
        buffer = self._buffer_for(record.nbytes, must=False)
        if buffer is not None:
            self._reads[key] = (self._reader.submit(self._read, record, buffer), buffer.numel())
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
            tensors = self._read(record, self._buffer_for(record.nbytes, must=True))
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

    def write_behind(
        self, key: Key, name: str, version: int, written: Callable[[PartRecord], None]
    ) -> None:
        """Write the resident copy of ``key`` as ``version`` in the background.

        With direct I/O the copy becomes its file image first (once: later versions are
        updated in place), so get ``key`` again rather than keep its old tensors. ``written``
        receives the new file's record once it is durable (on the writer thread). The tensors
        must not change until ``wait_write(key)`` returns.
        """
        self.wait_write(key)  # an earlier version of this part must be on disk first
        entry = self._entries[key]
        if self.store.direct:  # from now on this part is written straight from memory
            entry.tensors = as_image(entry.tensors)
        entry.nbytes = tensors_nbytes(entry.tensors)
        tensors, (chunk, part) = entry.tensors, key

        def write() -> PartRecord:
            try:
                with self.stats.io():
                    record = self.store.write(chunk, name, part, version, tensors)
            except BaseException as exc:
                self._failure = exc
                raise
            written(record)
            return record

        self._writes[key] = self._writer.submit(write)
        self.stats.add(written=part_nbytes(tensors))
        self._note_resident()

    def wait_write(self, key: Key) -> None:
        """Block until the write of ``key`` in flight, if any, is durable (raise if it failed)."""
        future = self._writes.pop(key, None)
        if future is None:
            return
        started = time.perf_counter()
        future.result()
        self.stats.io_wait += time.perf_counter() - started

    def after_writes(self, task: Callable[[], None]) -> Future[None]:
        """Run ``task`` on the writer thread once every write submitted so far is durable.

        If any write failed since the last ``clear``, the task does not run: its future raises
        that write's error instead.
        """

        def guarded() -> None:
            if self._failure is not None:
                raise self._failure
            task()

        return self._writer.submit(guarded)

    def clear(self) -> None:
        """Forget everything (after a failed step: resident copies may be half updated).

        Queued reads are cancelled (a running one finishes unseen); everything queued on the
        writer thread is waited for.
        """
        for future, _ in self._reads.values():
            future.cancel()
        self._writer.submit(lambda: None).result()
        self._failure = None
        self._reads.clear()
        self._writes.clear()
        self._entries.clear()
        self._pinned.clear()

    def close(self) -> None:
        self.clear()
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
