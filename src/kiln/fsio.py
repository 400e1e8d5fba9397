"""Crash-safe file writes and checksums.

Every file whose loss or corruption would cost a run goes through ``atomic_write``: the bytes
land in a temporary file in the same folder, are fsynced, renamed over the target and the folder
is fsynced, so a kill at any instant leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

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
