"""Teacher embeddings cached on disk, one safetensors file per (encoder, text) content hash.

A text's key is the SHA-256 of the encoder's name and the text, so a cache folder can be shared
by runs, configs and encoders: a changed text or encoder is a new key, never a stale hit. Files
are renamed into place (no fsync: losing an entry only costs recomputing it); a file that cannot
be read back is recomputed and rewritten. A cache that cannot be written (the folder is a file or
read-only, the disk is full) is a DataError naming the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from kiln.data.text_encoders import TextEncoder
from kiln.errors import DataError

TENSOR_NAME = "embedding"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


def embedding_key(encoder_name: str, text: str) -> str:
    """Hex content hash of (encoder name, text)."""
    return hashlib.sha256(f"{encoder_name}\0{text}".encode()).hexdigest()


class EmbeddingCache:
    """Embeddings of ``encoder`` under ``root`` (None: compute every time, store nothing)."""

    def __init__(self, encoder: TextEncoder, root: Path | None) -> None:
        self.encoder = encoder
        self.root = Path(root).expanduser() if root is not None else None
        self.stats = CacheStats()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> torch.Tensor | None:
        try:
            vector = load_file(self._path(key))[TENSOR_NAME]
        except (SafetensorError, KeyError, OSError):
            # Absent or damaged: recomputed below. An unusable folder is reported by the write.
            return None
        return vector if vector.shape == (self.encoder.dim,) else None

    def _write(self, key: str, vector: torch.Tensor) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(save({TENSOR_NAME: vector.clone()}))
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)  # a full disk must not also keep a partial entry
                raise
        except OSError as exc:
            raise DataError(
                f"cannot write the embedding cache in {self.root} ({exc.strerror or exc}); fix "
                "lattice.cache_dir (a writable folder with free space) or set it to null"
            ) from exc

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) float32: cached vectors where present, the encoder's for the rest."""
        unique = list(dict.fromkeys(texts))
        vectors: dict[str, torch.Tensor] = {}
        keys = {text: embedding_key(self.encoder.name, text) for text in unique}
        if self.root is not None:
            for text in unique:
                found = self._read(keys[text])
                if found is not None:
                    vectors[text] = found
        missing = [text for text in unique if text not in vectors]
        self.stats.hits += len(unique) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            fresh = self.encoder.encode(missing)
            for text, vector in zip(missing, fresh, strict=True):
                vectors[text] = vector.contiguous()
                if self.root is not None:
                    self._write(keys[text], vectors[text])
        return torch.stack([vectors[text] for text in texts]).float()
