"""Crash-safe file writes, checksums and the JSON text of the files Kiln writes.

Every file whose loss or corruption would cost a run goes through ``atomic_write``: the bytes
land in a temporary file in the same folder, are fsynced, renamed over the target and the folder
is fsynced, so a kill at any instant leaves either the old file or the new one, never a mix.
Every JSON document Kiln writes is made by ``json_text``, which writes strict JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_HASH_BLOCK = 1 << 20


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename, a new file), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on clean exit it replaces ``path`` durably."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    with atomic_writer(path, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def json_text(obj: Any, **options: Any) -> str:
    """``json.dumps(obj, **options)`` as strict JSON: a NaN or infinite float becomes null.

    Python's json writes non-finite floats as the bare tokens ``NaN`` and ``Infinity``, which
    strict readers (jq, JavaScript, most log tools) reject: one diverged loss would make a run's
    metrics unreadable to them. ``allow_nan=False`` turns a value this cannot replace (a float
    dict key) into a ValueError here instead of a file those readers reject.
    """
    return json.dumps(_finite_or_none(obj), allow_nan=False, **options)


def _finite_or_none(obj: Any) -> Any:
    """``obj`` with each non-finite float, in any list, tuple or dict value, replaced by None."""
    if isinstance(obj, float):  # np.float64 too: it is a float
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(item) for item in obj]
    return obj
