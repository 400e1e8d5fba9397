"""The on-disk embedding cache: hits, misses, keys by (encoder, text), damaged entries."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from kiln.data import embedding_cache
from kiln.data.embedding_cache import EmbeddingCache, embedding_key
from kiln.data.text_encoders import HashedNgramEncoder
from kiln.errors import DataError


class CountingEncoder(HashedNgramEncoder):
    """The hashed encoder, counting the texts it was asked to encode."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.encoded: list[str] = []

    def encode(self, texts: list[str]) -> torch.Tensor:  # type: ignore[override]
        self.encoded += list(texts)
        return super().encode(texts)


def test_miss_then_hit_across_cache_instances(tmp_path: Path) -> None:
    first = CountingEncoder(8)
    cache = EmbeddingCache(first, tmp_path)
    texts = ["alpha", "beta", "alpha"]
    a = cache.embed(texts)
    assert first.encoded == ["alpha", "beta"]  # duplicates are encoded once
    assert (cache.stats.hits, cache.stats.misses) == (0, 2)
    again = CountingEncoder(8)
    cache2 = EmbeddingCache(again, tmp_path)
    b = cache2.embed(["beta", "alpha", "gamma"])
    assert again.encoded == ["gamma"]
    assert (cache2.stats.hits, cache2.stats.misses) == (2, 1)
    assert torch.equal(b[0], a[1]) and torch.equal(b[1], a[0])
    assert torch.equal(a, HashedNgramEncoder(8).encode(texts))


def test_another_encoder_is_another_key(tmp_path: Path) -> None:
    EmbeddingCache(CountingEncoder(8), tmp_path).embed(["alpha"])
    other = CountingEncoder(16)
    out = EmbeddingCache(other, tmp_path).embed(["alpha"])
    assert other.encoded == ["alpha"] and out.shape == (1, 16)
    assert embedding_key("e1", "t") != embedding_key("e2", "t")
    assert embedding_key("e1", "t") != embedding_key("e1", "t ")


def test_damaged_entry_is_recomputed(tmp_path: Path) -> None:
    EmbeddingCache(CountingEncoder(8), tmp_path).embed(["alpha"])
    (entry,) = tmp_path.rglob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    encoder = CountingEncoder(8)
    out = EmbeddingCache(encoder, tmp_path).embed(["alpha"])
    assert encoder.encoded == ["alpha"]
    assert torch.equal(out, HashedNgramEncoder(8).encode(["alpha"]))
    assert EmbeddingCache(CountingEncoder(8), tmp_path).embed(["alpha"]).shape == (1, 8)


def test_no_cache_dir_computes_every_time(tmp_path: Path) -> None:
    encoder = CountingEncoder(4)
    cache = EmbeddingCache(encoder, None)
    cache.embed(["a"])
    cache.embed(["a"])
    assert encoder.encoded == ["a", "a"]


def test_a_cache_dir_that_is_a_file_is_a_data_error(tmp_path: Path) -> None:
    root = tmp_path / "embeddings"
    root.write_text("not a folder")
    with pytest.raises(DataError) as err:
        EmbeddingCache(CountingEncoder(4), root).embed(["a"])
    message = str(err.value)
    assert str(root) in message and "Not a directory" in message
    assert "lattice.cache_dir" in message and "null" in message


def test_a_full_disk_is_a_data_error_and_leaves_no_partial_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(embedding_cache.os, "replace", full)
    with pytest.raises(DataError, match="No space left on device") as err:
        EmbeddingCache(CountingEncoder(4), tmp_path).embed(["a"])
    assert str(tmp_path) in str(err.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
