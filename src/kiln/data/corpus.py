"""The corpus: which files to read, how to read them one at a time, and the train/val split.

Everything here is deterministic and machine-independent: files are sorted by their path parts
(not by ``Path`` ordering, which changed between Python versions) and the split is a hash of
the root-relative path, so the same tree gives the same documents in the same order anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from kiln.errors import DataError

STDLIB = "stdlib"


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_root(root: str) -> Path:
    """``"stdlib"`` means :func:`stdlib_root`; anything else is a path (``~`` expanded)."""
    return stdlib_root() if root == STDLIB else Path(root).expanduser()


@dataclass(frozen=True)
class Source:
    """A root folder and glob patterns, matched against paths relative to the root.

    ``**`` spans any number of folders (including none), ``*`` and ``?`` stay within one.
    """

    root: str
    include: tuple[str, ...] = ("**/*.py",)
    exclude: tuple[str, ...] = ()


@dataclass
class CorpusStats:
    """What :func:`find_files` and :func:`iter_documents` skipped, and what was read.

    ``files_skipped`` counts every entry left out, including folders that could not be listed.
    """

    files_read: int = 0
    files_skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0

    def skip(self, reason: str) -> None:
        """Count one skipped file."""
        self.files_skipped += 1
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob over '/'-separated relative paths."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def glob_match(relative: str, pattern: str) -> bool:
    """Whether a '/'-separated relative path matches a glob pattern (whole path)."""
    return _glob_regex(pattern).fullmatch(relative) is not None


def _walk(root: Path, stats: CorpusStats) -> Iterator[tuple[Path, str]]:
    """Every file under ``root`` as (path, root-relative posix path); no symlinked dirs.

    Broken symlinks are listed too, so that reading them counts them as skipped rather than
    losing them without a word; so is a folder that cannot be listed (``unlistable_folder``).
    """

    def unlistable(_error: OSError) -> None:
        stats.skip("unlistable_folder")

    for folder, dirs, names in os.walk(root, onerror=unlistable):
        dirs.sort()
        base = Path(folder)
        for name in sorted(names):
            path = base / name
            if path.is_file() or (path.is_symlink() and not path.exists()):
                yield path, path.relative_to(root).as_posix()


def find_files(
    sources: Sequence[Source], stats: CorpusStats, max_files: int | None = None
) -> list[Path]:
    """The files the sources select: sorted by path parts, deduplicated, at most ``max_files``.

    A source that selects no file at all is an error, even beside sources that do: its data
    would be missing from the corpus without a word. Folders that cannot be listed are counted
    in ``stats``.
    """
    found: dict[Path, Path] = {}  # resolved -> as found, so overlapping sources count once
    empty: list[str] = []
    for number, source in enumerate(sources):
        root = resolve_root(source.root)
        if not root.is_dir():
            raise DataError(
                f"corpus root {source.root!r} ({root}) is not a folder; "
                f"fix data.sources[{number}].root or create it"
            )
        matched = 0
        for path, relative in _walk(root, stats):
            if any(glob_match(relative, p) for p in source.include) and not any(
                glob_match(relative, p) for p in source.exclude
            ):
                found.setdefault(path.resolve(), path)
                matched += 1
        if not matched:
            empty.append(
                f"data.sources[{number}]: {root} (include={list(source.include)}, "
                f"exclude={list(source.exclude)})"
            )
    if empty:
        raise DataError(
            "no corpus files found for " + "; ".join(empty) + " (matched nothing); "
            "check that source's root and include/exclude patterns (paths are matched relative "
            "to the root, '*' stays within one folder, '**/' spans folders), or remove it"
        )
    files = sorted(found.values(), key=lambda p: p.parts)
    return files if max_files is None else files[:max_files]


def root_relative(path: Path, roots: Sequence[Path]) -> str:
    """``path`` relative to the first root that contains it, as a posix string."""
    for root in roots:
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    raise ValueError(f"{path} is under none of {[str(r) for r in roots]}")


class Document(NamedTuple):
    """A readable corpus file: its text, and the size and SHA-256 of its bytes."""

    path: Path
    text: str
    nbytes: int
    sha256: str  # hex


def iter_documents(files: Sequence[Path], stats: CorpusStats) -> Iterator[Document]:
    """Yield each usable file as a ``Document``, one at a time; skip and count bad files, never
    raise for one.

    Reasons: ``unreadable`` (permissions, vanished, a broken symlink), ``not_utf8``, ``empty``
    (no bytes or whitespace only: nothing to learn from), ``duplicate`` (the same bytes as a
    file yielded before: a second copy could otherwise land in the other split and leak
    training text into validation).
    """
    seen: set[str] = set()
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            stats.skip("unreadable")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("not_utf8")
            continue
        if not text.strip():
            stats.skip("empty")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            stats.skip("duplicate")
            continue
        seen.add(digest)
        stats.files_read += 1
        stats.bytes_read += len(data)
        yield Document(path, text, len(data), digest)


def split_of(path: Path, root_relative: str, val_fraction: float, seed: int) -> str:
    """``"train"`` or ``"val"`` from a hash of (seed, root-relative path).

    Only ``root_relative`` enters the hash (``path`` is accepted for callers' convenience) so the
    split is the same on every machine and in any file order. The caller guarantees a non-empty
    val split on tiny corpora.
    """
    # fsencode: a file name that is not UTF-8 (surrogate-escaped by os) hashes as its bytes.
    digest = hashlib.sha256(f"{seed}\0".encode() + os.fsencode(root_relative)).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if draw < val_fraction else "train"
