"""Corpus discovery, reading and splitting."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kiln.data.corpus import (
    CorpusStats,
    Source,
    find_files,
    glob_match,
    iter_documents,
    resolve_root,
    split_of,
    stdlib_root,
)
from kiln.errors import DataError


def _write(root: Path, files: dict[str, bytes | str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)


def _rel(files: list[Path], root: Path) -> list[str]:
    return [f.relative_to(root).as_posix() for f in files]


def test_find_files_sorted_filtered_and_deduplicated(tmp_path: Path) -> None:
    names = [
        "b/y.py",
        "a-c/x.py",
        "a/b.py",
        "a/test/t.py",
        "site-packages/z.py",
        "notes.txt",
        "m.py",
    ]
    _write(tmp_path, {n: "x = 1\n" for n in names})
    source = Source(str(tmp_path), exclude=("site-packages/**", "**/test/**"))
    files = find_files([source, Source(str(tmp_path), include=("a/*.py",))], CorpusStats())
    # Sorted by path parts ("a" < "a-c"), not by string, and listed once despite two sources.
    assert _rel(files, tmp_path) == ["a/b.py", "a-c/x.py", "b/y.py", "m.py"]
    first_two = find_files([source], CorpusStats(), max_files=2)
    assert _rel(first_two, tmp_path) == ["a/b.py", "a-c/x.py"]


def test_find_files_missing_root_and_no_match(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        find_files([Source(str(missing))], CorpusStats())
    _write(tmp_path, {"only.txt": "text"})
    with pytest.raises(DataError, match=r"matched nothing") as info:
        find_files([Source(str(tmp_path))], CorpusStats())
    assert "**/*.py" in str(info.value)


def test_a_source_that_matches_nothing_is_an_error_beside_others(tmp_path: Path) -> None:
    _write(tmp_path, {"a.py": "x = 1\n", "docs/b.md": "text"})
    good = Source(str(tmp_path))
    typo = Source(str(tmp_path / "docs"), include=("*.rst",))
    with pytest.raises(DataError, match=r"data\.sources\[1\]: .*docs .*\*\.rst.*matched nothing"):
        find_files([good, typo], CorpusStats())
    # A source whose files an earlier source already selected still matched them: no error.
    overlapping = [good, Source(str(tmp_path), include=("a.py",))]
    assert _rel(find_files(overlapping, CorpusStats()), tmp_path) == ["a.py"]


def test_glob_match() -> None:
    assert glob_match("a.py", "**/*.py")
    assert glob_match("x/y/a.py", "**/*.py")
    assert not glob_match("x/a.pyc", "**/*.py")
    assert glob_match("test/sub/a.py", "test/**")
    assert not glob_match("lib/test/a.py", "test/**")
    assert glob_match("lib/test/a.py", "**/test/**")
    assert not glob_match("x/a.py", "*.py")
    assert glob_match("a/b.py", "a/?.py")


def test_resolve_root() -> None:
    assert resolve_root("stdlib") == stdlib_root()
    assert resolve_root("~/corpus") == Path.home() / "corpus"
    assert resolve_root("rel/dir") == Path("rel/dir")


def test_iter_documents_skips_and_counts_bad_files(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "a.py": "print('héllo')\n",
            "b.py": b"\xff\xfe\x00bad",
            "c.py": b"",
            "d.py": " \n\t\n",
            "e.py": "x = 2\n",
        },
    )
    (tmp_path / "dir.py").mkdir()
    paths = [tmp_path / n for n in ("a.py", "b.py", "c.py", "d.py", "gone.py", "dir.py", "e.py")]
    stats = CorpusStats()
    docs = [(doc.path, doc.text) for doc in iter_documents(paths, stats)]
    assert docs == [(tmp_path / "a.py", "print('héllo')\n"), (tmp_path / "e.py", "x = 2\n")]
    assert stats.files_read == 2
    assert stats.files_skipped == 5
    assert stats.skipped_by_reason == {"not_utf8": 1, "empty": 2, "unreadable": 2}
    assert stats.bytes_read == len("print('héllo')\n".encode()) + len("x = 2\n")


def test_a_broken_symlink_is_found_and_counted_as_unreadable(tmp_path: Path) -> None:
    _write(tmp_path, {"a.py": "a = 1\n"})
    (tmp_path / "gone.py").symlink_to(tmp_path / "missing.py")
    (tmp_path / "alias.py").symlink_to(tmp_path / "a.py")
    files = find_files([Source(str(tmp_path))], CorpusStats())
    assert _rel(files, tmp_path) == ["a.py", "gone.py"]  # the alias resolves to a.py: once
    stats = CorpusStats()
    assert [doc.text for doc in iter_documents(files, stats)] == ["a = 1\n"]
    assert stats.skipped_by_reason == {"unreadable": 1}


def test_a_folder_that_cannot_be_listed_is_counted_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, {"a.py": "a = 1\n", "locked/b.py": "b = 2\n", "open/c.py": "c = 3\n"})
    real_scandir = os.scandir

    def scandir(path):  # permissions cannot stop root, so the refusal is simulated
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stats = CorpusStats()
    assert _rel(find_files([Source(str(tmp_path))], stats), tmp_path) == ["a.py", "open/c.py"]
    assert stats.skipped_by_reason == {"unlistable_folder": 1}


def test_a_second_copy_of_the_same_bytes_is_skipped_as_a_duplicate(tmp_path: Path) -> None:
    _write(tmp_path, {"a.py": "x = 1\n", "b.py": "y = 2\n", "c/a_copy.py": "x = 1\n"})
    stats = CorpusStats()
    paths = [tmp_path / n for n in ("a.py", "b.py", "c/a_copy.py")]
    assert [doc.path.name for doc in iter_documents(paths, stats)] == ["a.py", "b.py"]
    assert stats.files_read == 2 and stats.skipped_by_reason == {"duplicate": 1}
    assert stats.bytes_read == 12


def test_iter_documents_is_lazy(tmp_path: Path) -> None:
    _write(tmp_path, {"a.py": "a = 1\n", "b.py": "b = 2\n"})
    stats = CorpusStats()
    docs = iter_documents([tmp_path / "a.py", tmp_path / "b.py"], stats)
    assert next(docs)[1] == "a = 1\n"
    assert stats.files_read == 1


def test_split_of_is_a_stable_hash_of_the_relative_path() -> None:
    names = [f"pkg/mod_{i}.py" for i in range(2000)]
    splits = [split_of(Path("/x") / n, n, 0.2, seed=7) for n in names]
    assert splits == [split_of(Path("/elsewhere") / n, n, 0.2, seed=7) for n in names]
    assert set(splits) == {"train", "val"}
    assert 0.17 < splits.count("val") / len(names) < 0.23
    assert splits != [split_of(Path(n), n, 0.2, seed=8) for n in names]
    assert {split_of(Path(n), n, 0.0, seed=7) for n in names} == {"train"}
    # Fixed across processes, machines and versions: the split is part of the data's identity.
    assert [split_of(Path("x"), f"m{i}.py", 0.5, seed=0) for i in range(8)] == [
        "train",
        "train",
        "val",
        "val",
        "val",
        "train",
        "train",
        "train",
    ]


def test_a_file_name_that_is_not_utf8_is_split_by_its_bytes(tmp_path: Path) -> None:
    """Old archives hold Latin-1 names; os hands them over surrogate-escaped."""
    (tmp_path / os.fsdecode(b"caf\xe9.py")).write_text("x = 1\n", encoding="utf-8")
    (path,) = find_files([Source(str(tmp_path))], CorpusStats())
    relative = path.relative_to(tmp_path).as_posix()
    assert relative == "caf\udce9.py"
    digest = hashlib.sha256(b"7\0caf\xe9.py").digest()
    expected = "val" if int.from_bytes(digest[:8], "big") / 2**64 < 0.5 else "train"
    assert split_of(path, relative, 0.5, seed=7) == expected


def test_real_stdlib_files() -> None:
    files = find_files([Source("stdlib", include=("json/*.py",))], CorpusStats())
    names = [f.name for f in files]
    assert "__init__.py" in names and "decoder.py" in names
    stats = CorpusStats()
    texts = {doc.path.name: doc.text for doc in iter_documents(files, stats)}
    assert stats.files_read == len(files) and stats.files_skipped == 0
    assert "class JSONDecoder" in texts["decoder.py"]
