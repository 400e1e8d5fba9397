"""The GPT decoder: shapes, causality, tying, generation."""

from __future__ import annotations

import pytest
import torch

from kiln.models.gpt import GPT, GPTShape

SHAPE = GPTShape(
    vocab_size=97, context=16, n_layers=2, n_heads=2, d_model=32, mlp_ratio=4,
    dropout=0.0, bias=True, layernorm_eps=1e-5, init_std=0.02,
)


def make(seed: int = 0, **changes: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTShape(**{**SHAPE.__dict__, **changes}))


def test_logits_shape() -> None:
    model = make()
    idx = torch.randint(0, 97, (3, 10))
    assert model(idx).shape == (3, 10, 97)


def test_causal_future_tokens_do_not_change_past_logits() -> None:
    model = make().eval()
    idx = torch.randint(0, 97, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    assert torch.equal(model(idx)[0, :8], model(changed)[0, :8])
    assert not torch.equal(model(idx)[0, 8:], model(changed)[0, 8:])


def test_head_is_tied_to_embedding() -> None:
    model = make()
    assert model.head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    # The tied matrix is counted once.
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_same_seed_same_init_and_residual_projection_scaled() -> None:
    a, b = make(seed=3), make(seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    big = make(seed=0, n_layers=8, d_model=256, n_heads=4)
    assert big.blocks[0].attn.proj.weight.std() < 0.6 * big.blocks[0].attn.qkv.weight.std()


def test_context_limit_is_enforced() -> None:
    with pytest.raises(ValueError, match="exceeds the context"):
        make()(torch.zeros(1, 17, dtype=torch.long))


def test_greedy_generation_is_deterministic_and_stops() -> None:
    model = make().eval()
    start = torch.tensor([[1, 2, 3]])
    out1 = model.generate(start, 5, temperature=0.0, top_k=0)
    out2 = model.generate(start, 5, temperature=0.0, top_k=0)
    assert torch.equal(out1, out2) and out1.shape == (1, 8)
    first = int(out1[0, 3])
    stopped = model.generate(start, 5, temperature=0.0, top_k=0, stop_token=first)
    assert stopped.shape == (1, 4)


def test_sampling_uses_the_given_generator_only() -> None:
    model = make().eval()
    start = torch.tensor([[5]])
    rng_before = torch.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = model.generate(start, 6, temperature=1.0, top_k=10, generator=g1)
    b = model.generate(start, 6, temperature=1.0, top_k=10, generator=g2)
    assert torch.equal(a, b)
    assert torch.equal(rng_before, torch.get_rng_state())


def test_dropout_active_only_in_training() -> None:
    model = make(dropout=0.5)
    idx = torch.randint(0, 97, (2, 8))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))
