"""Validation loss and perplexity, overall and per objective, over fixed weighted windows."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.data.loader import Stream, WindowTransform
from kiln.data.objectives import COMPONENTS


def validation_windows(
    stream: Stream, seq_len: int, count: int, transform: WindowTransform
) -> dict[str, np.ndarray]:
    """The first ``count`` non-overlapping windows of a split (fewer if it is short), weighted."""
    count = min(count, (len(stream) - 1) // seq_len)
    parts = [transform(stream.read(i * seq_len, seq_len + 1), 0, i) for i in range(count)]
    if not parts:
        return {}
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def token_cross_entropy(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``, per position."""
    logits = model(tokens[:, :-1])  # (B, T, V)
    targets = tokens[:, 1:]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="none"
    )
    return ce.view_as(targets)


def perplexity_metrics(prefix: str, loss_sum: float, count: float) -> dict[str, float]:
    """``<prefix>loss`` and ``<prefix>ppl`` of a summed loss, if anything was counted."""
    if count <= 0:
        return {}
    loss = loss_sum / count
    return {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, windows: list[dict[str, np.ndarray]], batch_size: int, device: torch.device
) -> dict[str, float]:
    """Weighted validation loss (what training minimises) and each objective's mean loss.

    ``val_loss`` is ``sum(w * ce) / sum(w)`` over every set of windows; ``val_<name>_loss`` is
    the mean cross-entropy over the trained tokens of objective ``name``.
    """
    weighted, weight_total = 0.0, 0.0
    sums = torch.zeros(len(COMPONENTS), dtype=torch.float64)
    counts = torch.zeros(len(COMPONENTS), dtype=torch.float64)
    for group in windows:
        for start in range(0, len(group.get("tokens", ())), batch_size):
            batch = {k: torch.from_numpy(v[start : start + batch_size]).to(device)
                     for k, v in group.items()}
            ce = token_cross_entropy(model, batch["tokens"]).double()
            w = batch["weights"].double()
            weighted += (ce * w).sum().item()
            weight_total += w.sum().item()
            trained = w > 0
            components = batch["components"][trained]
            sums += torch.bincount(components, ce[trained], len(COMPONENTS)).cpu()
            counts += torch.bincount(components, minlength=len(COMPONENTS)).cpu().double()
    metrics = perplexity_metrics("val_", weighted, weight_total)
    for index, name in enumerate(COMPONENTS):
        metrics |= perplexity_metrics(f"val_{name}_", sums[index].item(), counts[index].item())
    return metrics
