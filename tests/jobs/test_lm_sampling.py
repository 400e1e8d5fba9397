"""Sampling text from a code LM: where a continuation ends."""

from __future__ import annotations

import pytest
import torch

from kiln.data.tokenizer import EOT, FIM_MIDDLE, REASONING, train_tokenizer
from kiln.jobs.lm_sampling import sample_text
from kiln.models.gpt import GPT, GPTShape


@pytest.mark.parametrize("special", [EOT, FIM_MIDDLE, REASONING])
def test_a_continuation_ends_at_any_special_token(
    monkeypatch: pytest.MonkeyPatch, special: str
) -> None:
    tokenizer = train_tokenizer(["def f(x):\n    return x\n"] * 20, vocab_size=300,
                                min_frequency=1)
    model = GPT(GPTShape(vocab_size=tokenizer.vocab_size, context=16, n_layers=1, n_heads=1,
                         d_model=8, mlp_ratio=2, dropout=0.0, bias=False, layernorm_eps=1e-5,
                         init_std=0.02))
    words = tokenizer.encode(" return x")
    after = [tokenizer.token_id(special), *tokenizer.encode(" junk")]

    def emits(idx: torch.Tensor, max_new_tokens: int, **_: object) -> torch.Tensor:
        return torch.cat([idx, torch.tensor([[*words, *after]])], dim=1)

    monkeypatch.setattr(model, "generate", emits)
    text = sample_text(model, tokenizer, "def f(x):\n   ", max_new_tokens=8, temperature=1.0,
                       top_k=0, seed=0)
    assert text == "def f(x):\n    return x"
