"""The GPT decoder: shapes, causality, tying, generation."""

from __future__ import annotations

import pytest
import torch

from kiln.models.gpt import GPT, GPTShape, LayerCache

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
    stopped = model.generate(start, 5, temperature=0.0, top_k=0, stop_tokens=[first])
    assert stopped.shape == (1, 4)


def test_a_batch_stops_when_every_row_has_stopped() -> None:
    model = make().eval()
    start = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(start, 6, temperature=0.0, top_k=0)
    ends = [int(free[0, 4]), int(free[1, 3])]
    new = free[:, 3:].tolist()
    first_stop = [next(i for i, t in enumerate(row) if t in ends) for row in new]
    out = model.generate(start, 6, temperature=0.0, top_k=0, stop_tokens=ends)
    assert out.shape == (2, 3 + max(first_stop) + 1)
    assert torch.equal(out, free[:, : out.shape[1]])


def uncached_greedy(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Generation as the definition says: the whole (cropped) text through the model each step."""
    for _ in range(steps):
        logits = model(idx[:, -model.shape.context :])[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize(("prompt", "steps"), [(3, 10), (3, 20), (16, 4), (20, 3)])
def test_cached_generation_matches_recomputing_everything(prompt: int, steps: int) -> None:
    # Double precision so the comparison is about the algorithm, not rounding ties.
    model = make(seed=4).double().eval()
    idx = torch.randint(0, 97, (3, prompt), generator=torch.Generator().manual_seed(1))
    cached = model.generate(idx, steps, temperature=0.0, top_k=0)
    assert torch.equal(cached, uncached_greedy(model, idx, steps))


def test_cache_extends_and_refuses_blocks_after_the_first() -> None:
    model = make().eval()
    idx = torch.randint(0, 97, (2, 6))
    cache = [LayerCache() for _ in model.blocks]
    first = model(idx[:, :5], cache)
    assert cache[0].length == 5
    last = model(idx[:, 5:], cache)[:, -1]
    assert torch.allclose(last, model(idx)[:, -1], atol=1e-5)
    assert torch.allclose(first, model(idx[:, :5]), atol=1e-6)
    with pytest.raises(ValueError, match="one token at a time"):
        model(idx[:, :2], cache)


def test_sampling_uses_the_given_generator_only() -> None:
    model = make().eval()
    start = torch.tensor([[5]])
    rng_before = torch.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = model.generate(start, 6, temperature=1.0, top_k=10, generator=g1)
    b = model.generate(start, 6, temperature=1.0, top_k=10, generator=g2)
    assert torch.equal(a, b)
    assert torch.equal(rng_before, torch.get_rng_state())


def test_a_tiny_temperature_samples_the_greedy_tokens() -> None:
    model = make().eval()
    start = torch.tensor([[5]])
    greedy = model.generate(start, 6, temperature=0.0, top_k=0)
    for top_k in (0, 10):  # logits / 1e-40 overflowed to inf, and softmax gave NaN
        tiny = model.generate(start, 6, temperature=1e-40, top_k=top_k,
                              generator=torch.Generator().manual_seed(0))
        assert torch.equal(tiny, greedy)


def test_dropout_active_only_in_training() -> None:
    model = make(dropout=0.5)
    idx = torch.randint(0, 97, (2, 8))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))
