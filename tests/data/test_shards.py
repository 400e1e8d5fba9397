"""Token shards: build, reuse by content key, cross-shard reads, verification and rebuild."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.data import shards
from kiln.data.corpus import Source
from kiln.data.shards import TokenData, TokenStream, prepare_token_data, verify_index
from kiln.errors import DataError
from kiln.fsio import sha256_file


def _corpus(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"pkg{i % 3}" / f"mod_{i:02d}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            f"import os\n\n\ndef handler_{i}(request, limit={i}):\n"
            f'    """Handle request number {i} (ünïcode ✓)."""\n'
            f"    items = [x * {i} for x in range(limit)]\n    return sum(items)\n",
            encoding="utf-8",
        )
        paths.append(path)
    return sorted(paths, key=lambda p: p.parts)


def _prepare(corpus: Path, cache: Path, logs: list[str] | None = None, **overrides) -> TokenData:
    params = dict(
        vocab_size=320,
        min_frequency=2,
        val_fraction=0.2,
        split_seed=0,
        shard_tokens=64,
        max_files=None,
        tokenizer_train_bytes=1 << 20,
    )
    params.update(overrides)
    log = (logs if logs is not None else []).append
    return prepare_token_data([Source(str(corpus))], cache, log=log, **params)


def _all_tokens(stream: TokenStream) -> np.ndarray:
    return stream.read(0, len(stream))


def _documents(data: TokenData, split: str) -> list[str]:
    ids = _all_tokens(data.split(split)).tolist()
    eot = data.tokenizer.eot_id
    assert ids and ids[-1] == eot  # every document ends with EOT
    docs, start = [], 0
    for i, token in enumerate(ids):
        if token == eot:
            docs.append(data.tokenizer.decode(ids[start:i]))
            start = i + 1
    return docs


def test_build_contents_and_index(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "src", 20)
    (tmp_path / "src" / "latin1.py").write_bytes(b"x = '\xe9'\n")
    (tmp_path / "src" / "empty.py").write_bytes(b"")
    logs: list[str] = []
    data = _prepare(tmp_path / "src", tmp_path / "cache", logs)
    index = data.index
    texts = [f.read_text(encoding="utf-8") for f in files]
    train, val = _documents(data, "train"), _documents(data, "val")
    # A partition of the documents, each split in corpus order.
    assert sorted(train + val) == sorted(texts)
    assert train == [t for t in texts if t in train] and val == [t for t in texts if t in val]
    assert val and train
    assert index["splits"]["train"]["documents"] == len(train)
    assert index["splits"]["val"]["documents"] == len(val)
    assert index["corpus"] == {
        "files_read": 20,
        "files_skipped": 2,
        "skipped_by_reason": {"not_utf8": 1, "empty": 1},
        "bytes_read": sum(len(t.encode()) for t in texts),
    }
    assert any("2 skipped (empty: 1, not_utf8: 1)" in line for line in logs)
    assert index["dtype"] == "uint16" and data.root.name == index["key"][:16]
    assert index["tokenizer"]["fingerprint"] == data.tokenizer.fingerprint()
    for split in ("train", "val"):
        entries = index["splits"][split]["shards"]
        assert [e["file"] for e in entries] == [f"{split}_{i:05d}.bin" for i in range(len(entries))]
        assert all(e["num_tokens"] == 64 for e in entries[:-1]) and entries[-1]["num_tokens"] > 0
        assert sum(e["num_tokens"] for e in entries) == index["splits"][split]["tokens"]
        for e in entries:
            assert sha256_file(data.root / e["file"]) == e["sha256"]
            assert (data.root / e["file"]).stat().st_size == 2 * e["num_tokens"]
    assert len(index["splits"]["train"]["shards"]) > 3  # several shards to read across
    assert verify_index(data.root, deep=True) == index
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_copies_of_one_file_never_sit_in_both_splits(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "src", 20)
    for i, original in enumerate(files):
        shutil.copy(original, tmp_path / "src" / f"copy_{i:02d}.py")
    data = _prepare(tmp_path / "src", tmp_path / "cache")
    train, val = _documents(data, "train"), _documents(data, "val")
    assert sorted(train + val) == sorted(f.read_text(encoding="utf-8") for f in files)
    assert data.index["corpus"]["skipped_by_reason"] == {"duplicate": 20}


def test_cross_shard_reads(tmp_path: Path) -> None:
    _corpus(tmp_path / "src", 12)
    data = _prepare(tmp_path / "src", tmp_path / "cache", shard_tokens=37)
    stream = data.split("train")
    entries = data.index["splits"]["train"]["shards"]
    whole = np.concatenate([np.fromfile(data.root / e["file"], dtype="<u2") for e in entries])
    assert len(stream) == len(whole) > 3 * 37
    rng = np.random.default_rng(0)
    for _ in range(200):
        start = int(rng.integers(0, len(whole)))
        length = int(rng.integers(0, min(200, len(whole) - start) + 1))
        chunk = stream.read(start, length)
        assert chunk.dtype == np.int64 and np.array_equal(chunk, whole[start : start + length])
    assert np.array_equal(stream.read(36, 2), whole[36:38])  # straddles the first boundary
    with pytest.raises(IndexError):
        stream.read(len(whole) - 1, 2)


def test_reuse_without_rebuild(tmp_path: Path) -> None:
    _corpus(tmp_path / "src", 10)
    first_logs: list[str] = []
    first = _prepare(tmp_path / "src", tmp_path / "cache", first_logs)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.root.iterdir()}
    logs: list[str] = []
    second = _prepare(tmp_path / "src", tmp_path / "cache", logs)
    assert any(line.startswith("training tokenizer") for line in first_logs)
    assert any(line.startswith("reusing token shards") for line in logs)
    assert not any("training" in line or "encoding" in line for line in logs)
    assert second.root == first.root and second.index == first.index
    assert {p.name: p.stat().st_mtime_ns for p in second.root.iterdir()} == mtimes
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()


def test_a_vocabulary_the_data_cannot_fill_is_reported(tmp_path: Path) -> None:
    _corpus(tmp_path / "src", 4)
    logs: list[str] = []
    data = _prepare(tmp_path / "src", tmp_path / "cache", logs, vocab_size=50_000)
    assert data.tokenizer.vocab_size < 50_000
    assert any(
        f"the tokenizer has {data.tokenizer.vocab_size} tokens, fewer than "
        "data.tokenizer.vocab_size 50000" in line
        for line in logs
    )


def test_content_or_settings_change_gives_a_new_key(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "src", 10)
    cache = tmp_path / "cache"
    base = _prepare(tmp_path / "src", cache).root
    files[3].write_text(files[3].read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    edited = _prepare(tmp_path / "src", cache).root
    assert edited != base
    assert _prepare(tmp_path / "src", cache, shard_tokens=65).root not in {base, edited}
    assert _prepare(tmp_path / "src", cache, max_files=9).root not in {base, edited}
    # Same content under another root path (another machine): same key.
    shutil.copytree(tmp_path / "src", tmp_path / "moved")
    assert _prepare(tmp_path / "moved", cache).root == edited


def test_truncated_shard_is_detected_and_rebuilt(tmp_path: Path) -> None:
    _corpus(tmp_path / "src", 10)
    data = _prepare(tmp_path / "src", tmp_path / "cache")
    original = _all_tokens(data.split("train"))
    shard = data.root / "train_00001.bin"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 2)
    with pytest.raises(DataError, match=r"train_00001\.bin has 126 bytes but .* records 128"):
        verify_index(data.root, deep=False)
    logs: list[str] = []
    rebuilt = _prepare(tmp_path / "src", tmp_path / "cache", logs)
    assert any("failed verification, rebuilding" in line for line in logs)
    assert rebuilt.root == data.root
    assert verify_index(rebuilt.root, deep=True) == data.index
    assert np.array_equal(_all_tokens(rebuilt.split("train")), original)


def test_corrupt_byte_needs_deep_verification(tmp_path: Path) -> None:
    _corpus(tmp_path / "src", 10)
    data = _prepare(tmp_path / "src", tmp_path / "cache")
    shard = data.root / "val_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    verify_index(data.root, deep=False)  # same size: the cheap check cannot see it
    with pytest.raises(DataError, match=r"val_00000.bin does not match its SHA-256"):
        verify_index(data.root, deep=True)


def test_bad_index_and_missing_files(tmp_path: Path) -> None:
    _corpus(tmp_path / "src", 6)
    data = _prepare(tmp_path / "src", tmp_path / "cache")
    index_path = data.root / "index.json"
    text = index_path.read_text(encoding="utf-8")
    index_path.write_text(text[:50], encoding="utf-8")
    with pytest.raises(DataError, match="not JSON"):
        verify_index(data.root, deep=False)
    broken = json.loads(text)
    del broken["splits"]["val"]
    index_path.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(DataError, match="malformed"):
        verify_index(data.root, deep=False)
    index_path.write_text(text, encoding="utf-8")
    (data.root / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json, listed in .* is missing"):
        verify_index(data.root, deep=False)
    index_path.unlink()
    with pytest.raises(DataError, match=r"index\.json is missing"):
        verify_index(data.root, deep=False)
    logs: list[str] = []
    assert verify_index(_prepare(tmp_path / "src", tmp_path / "cache", logs).root, deep=True)
    assert any("failed verification" in line for line in logs)


def test_tiny_corpus_still_has_a_val_split(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "src", 2)
    data = _prepare(tmp_path / "src", tmp_path / "cache", val_fraction=0.001)
    assert data.index["splits"]["train"]["documents"] == 1
    assert data.index["splits"]["val"]["documents"] == 1
    assert _documents(data, "val") == [files[-1].read_text(encoding="utf-8")]
    files[0].unlink()
    with pytest.raises(DataError, match="train split is empty"):
        _prepare(tmp_path / "src", tmp_path / "cache", val_fraction=0.001)


def test_a_single_document_asks_for_more_files_not_a_lower_val_fraction(tmp_path: Path) -> None:
    _corpus(tmp_path / "src", 3)
    with pytest.raises(DataError, match=r"1 usable document .*at least 2 are needed") as info:
        _prepare(tmp_path / "src", tmp_path / "cache", val_fraction=0.001, max_files=1)
    assert "val_fraction" not in str(info.value)


def test_unusable_corpus(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_bytes(b"\xff")
    with pytest.raises(DataError, match="none of the 1 corpus files is usable"):
        _prepare(tmp_path / "src", tmp_path / "cache")


def test_tokenizer_sees_only_the_train_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _corpus(tmp_path / "src", 10)
    seen: list[str] = []
    real = shards.train_tokenizer

    def spy(texts, vocab_size, min_frequency):
        texts = list(texts)
        seen.extend(texts)
        return real(texts, vocab_size, min_frequency)

    monkeypatch.setattr(shards, "train_tokenizer", spy)
    data = _prepare(tmp_path / "src", tmp_path / "cache", tokenizer_train_bytes=500)
    train = _documents(data, "train")
    assert 1 < len(seen) < len(train)
    assert sum(len(t.encode()) for t in seen) <= 500
    assert seen[:-1] == train[: len(seen) - 1]  # the leading train documents, in order
    assert train[len(seen) - 1].startswith(seen[-1])  # the last one cut to fit


def test_lost_publish_race_uses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _corpus(tmp_path / "src", 6)
    real_build = shards._build

    def build_then_lose(docs, stats, key, params, folder, log):
        index = real_build(docs, stats, key, params, folder, log)
        shutil.copytree(folder, folder.parent / key[:16])  # another process publishes first
        return index

    monkeypatch.setattr(shards, "_build", build_then_lose)
    logs: list[str] = []
    data = _prepare(tmp_path / "src", tmp_path / "cache", logs)
    assert any("another process built" in line for line in logs)
    assert verify_index(data.root, deep=True) == data.index
    assert sorted(os.listdir(tmp_path / "cache")) == [data.root.name]


def test_changed_file_during_build_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _corpus(tmp_path / "src", 6)
    real_scan = shards._scan

    def scan_then_edit(*args):
        result = real_scan(*args)
        files[0].write_text("changed = True\n", encoding="utf-8")
        return result

    monkeypatch.setattr(shards, "_scan", scan_then_edit)
    with pytest.raises(DataError, match=r"mod_00\.py changed while token shards were built"):
        _prepare(tmp_path / "src", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary folder is gone


def test_a_cache_dir_that_is_a_file_names_the_setting(tmp_path: Path) -> None:
    _corpus(tmp_path / "src", 4)
    occupied = tmp_path / "cache"
    occupied.write_text("not a folder")
    with pytest.raises(DataError, match=rf"token cache in {occupied} .*fix data.cache_dir"):
        _prepare(tmp_path / "src", occupied)
