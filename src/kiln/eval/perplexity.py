"""Validation loss and perplexity over a fixed, deterministic set of windows."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.data.shards import TokenStream


def validation_windows(stream: TokenStream, seq_len: int, count: int) -> np.ndarray:
    """The first ``count`` non-overlapping windows of a split (fewer if the split is short)."""
    available = (len(stream) - 1) // seq_len
    count = min(count, available)
    return np.stack([stream.read(i * seq_len, seq_len + 1) for i in range(count)])


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, windows: np.ndarray, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Mean next-token cross-entropy over ``windows`` and its exponential."""
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[start : start + batch_size]).to(device)
        logits = model(batch[:, :-1])
        targets = batch[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += targets.numel()
    val_loss = total_loss / max(total_tokens, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
