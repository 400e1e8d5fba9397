"""Step normalisation: exact weighted means however a step is cut into micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.data.loader import WindowLoader
from kiln.data.mixture import MixedBatches, normalize_step
from kiln.data.objectives import COMPONENTS, ArrayStream
from kiln.errors import DataError


def random_step(samples: int = 12, seq_len: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(samples, seq_len, generator=g) * 2
    weights[torch.rand(samples, seq_len, generator=g) < 0.2] = 0.0  # padding / prompts
    return {
        "tokens": torch.zeros(samples, seq_len + 1, dtype=torch.int64),
        "weights": weights,
        "components": torch.randint(0, len(COMPONENTS), (samples, seq_len), generator=g),
    }


def micro_batch_sums(
    batch: dict[str, torch.Tensor], ce: torch.Tensor, micro: int
) -> tuple[float, dict[int, float]]:
    """What the trainer adds up: each micro-batch's terms weighted by its share of samples."""
    samples = ce.shape[0]
    loss, parts = 0.0, dict.fromkeys(range(len(COMPONENTS)), 0.0)
    for lo in range(0, samples, micro):
        sl = slice(lo, lo + micro)
        positions = ce[sl].numel()
        share = ce[sl].shape[0] / samples
        loss += float((ce[sl] * batch["weights"][sl]).sum() / positions) * share
        scaled = ce[sl] * batch["component_scale"][sl]
        for c in parts:
            parts[c] += float((scaled * (batch["components"][sl] == c)).sum() / positions) * share
    return loss, parts


@pytest.mark.parametrize("micro", [1, 3, 5, 12])
def test_any_micro_batch_split_gives_the_exact_step_means(micro: int) -> None:
    raw = random_step()
    ce = torch.rand(raw["weights"].shape, generator=torch.Generator().manual_seed(1)) * 5
    batch = normalize_step(raw)
    loss, parts = micro_batch_sums(batch, ce, micro)
    w = raw["weights"]
    assert loss == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-5)
    for c, value in parts.items():
        trained = (raw["components"] == c) & (w > 0)
        assert value == pytest.approx(float(ce[trained].mean()), rel=1e-5)


def test_an_absent_component_scales_to_zero() -> None:
    raw = random_step()
    raw["components"][:] = 0
    batch = normalize_step(raw)
    assert torch.all(batch["component_scale"][raw["weights"] == 0] == 0)
    assert torch.all(batch["component_scale"][raw["weights"] > 0] > 0)


def loader(tokens: int, samples: int, offset: int) -> WindowLoader:
    stream = ArrayStream(np.arange(tokens, dtype=np.int64) + offset)

    def weighted(window: np.ndarray, _epoch: int, _id: int) -> dict[str, np.ndarray]:
        n = len(window) - 1
        return {"tokens": window, "weights": np.ones(n, np.float32),
                "components": np.zeros(n, np.int64)}

    return WindowLoader(stream, seq_len=4, samples_per_step=samples, shuffle=True, seed=3,
                        prefetch=0, transform=weighted)


def test_mixed_batches_concatenate_and_resume() -> None:
    mixed = MixedBatches({"code": loader(200, 3, 0), "cot": loader(100, 1, 10_000)})
    first = mixed.next_batch()
    assert first["tokens"].shape == (4, 5)
    assert torch.all(first["tokens"][3] >= 10_000) and torch.all(first["tokens"][:3] < 10_000)
    state = mixed.state_dict()
    expected = [mixed.next_batch()["tokens"] for _ in range(30)]
    again = MixedBatches({"code": loader(200, 3, 0), "cot": loader(100, 1, 10_000)})
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch()["tokens"]) for a in expected)


def test_a_checkpoint_without_a_cursor_for_a_loader_is_refused() -> None:
    state = MixedBatches({"code": loader(200, 3, 0)}).state_dict()
    both = MixedBatches({"code": loader(200, 3, 0), "cot": loader(100, 1, 10_000)})
    with pytest.raises(DataError, match=r"no data cursor for \['cot'\]"):
        both.load_state_dict(state)
