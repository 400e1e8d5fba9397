"""Which file holds each chunk part: the versions reads use, the ones the manifest names, and
the commit that makes the first the second.

A step writes new versions of every chunk it updates in the background; each becomes *current*
(what later reads use) once it is durable. The step's commit runs on the writer thread after
those writes, so it overlaps the next step: it replaces the manifest and only then makes the
versions *committed*. After a failed step the current versions go back to the committed ones.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from kiln.errors import CheckpointError
from kiln.streaming.cache import ChunkCache
from kiln.streaming.chunks import ChunkPlan
from kiln.streaming.store import (
    ChunkStore,
    PartRecord,
    decode_state_json,
    encode_state_json,
    record_dict,
)

WEIGHTS, STATE = "w", "s"
Records = list[dict[str, PartRecord | None]]


def _copy(records: Records) -> Records:
    return [dict(parts) for parts in records]


class ChunkVersions:
    """The version table of a chunk store, and its commits."""

    def __init__(
        self, store: ChunkStore, plan: ChunkPlan, first_commit: Callable[[], None] = lambda: None
    ) -> None:
        """``first_commit`` runs once, after this process's first commit is on disk."""
        self.store = store
        self.plan = plan
        self._first_commit: Callable[[], None] | None = first_commit
        self._current: Records | None = None
        self._committed: Records = []
        self._publishing: Future[None] | None = None

    @property
    def started(self) -> bool:
        """Whether the store holds this run's chunks (written fresh or found on resume)."""
        return self._current is not None

    def record(self, chunk: int, part: str) -> PartRecord | None:
        """The current file of a chunk part (None: never written, e.g. state before step 1)."""
        assert self._current is not None
        return self._current[chunk][part]

    def initialize(self) -> None:
        """Write version 0 of every chunk from the model's freshly initialised weights."""
        self.store.create()
        self.store.lock()
        self.store.sweep({"chunks": []})
        self._current = []
        for j, chunk in enumerate(self.plan.chunks):
            weights = {n: self.plan.data(n) for n in self.plan.owned[j]}
            record = self.store.write(j, chunk.name, WEIGHTS, 0, weights)
            self._current.append({WEIGHTS: record, STATE: None})
        self._committed = _copy(self._current)

    def resume(self) -> dict[str, Any] | None:
        """The trainer state of the last commit (chunks verified), or None before the first."""
        manifest = self.store.load_manifest()
        if manifest is None:
            return None
        self.store.lock()
        names = [c.name for c in self.plan.chunks]
        if [c["name"] for c in manifest["chunks"]] != names:
            raise CheckpointError(
                f"the stream store {self.store.root} holds chunks "
                f"{[c['name'] for c in manifest['chunks']]}, but the model has {names}; "
                "it belongs to another model. Start a new run."
            )
        self.store.verify(manifest)
        self.store.sweep(manifest)
        self._current = [
            {part: None if rec is None else PartRecord(**rec) for part, rec in c["parts"].items()}
            for c in manifest["chunks"]
        ]
        self._committed = _copy(self._current)
        return decode_state_json(manifest["state"])

    def written(self, chunk: int, part: str) -> Callable[[PartRecord], None]:
        """What a durable new version of a part reports to (called on the writer thread)."""
        assert self._current is not None
        current = self._current

        def note(record: PartRecord) -> None:
            current[chunk][part] = record

        return note

    def commit(
        self, step: int, state: dict[str, Any], meta: dict[str, Any], cache: ChunkCache | None
    ) -> None:
        """Make the versions written so far and ``state`` the committed step, in one atomic
        manifest replace.

        With a ``cache`` the replace runs on its writer thread as soon as the writes before it
        are durable; ``flush`` waits for it. A failed write stops it (and every later one) from
        running: the manifest never names a half-written step.
        """
        assert self._current is not None
        self.raise_failed()
        current, snapshot = self._current, encode_state_json(state)

        def publish() -> None:
            # On the writer thread: this step's writes are done, the next step's not begun.
            self.store.commit(
                {
                    "step": step,
                    "meta": meta,
                    "chunks": [
                        {"name": c.name, "parts": {p: record_dict(r) for p, r in parts.items()}}
                        for c, parts in zip(self.plan.chunks, current, strict=True)
                    ],
                    "state_keys": self.plan.state_keys,
                    "pieces": self.plan.pieces,
                    "state": snapshot,
                }
            )
            self._committed = _copy(current)
            if self._first_commit is not None:
                self._first_commit()
                self._first_commit = None

        if cache is None:  # nothing is in flight
            publish()
        else:
            self._publishing = cache.after_writes(publish)

    def flush(self) -> None:
        """Wait until the last commit is on disk; raise its error if it failed."""
        if self._publishing is not None:
            self._publishing.result()

    def raise_failed(self) -> None:
        """Raise the error of the last commit if it has run and failed."""
        if self._publishing is not None and self._publishing.done():
            self._publishing.result()

    def rollback(self) -> None:
        """Back to the committed versions (after a failed step, once the writer is idle)."""
        self._current = _copy(self._committed)
