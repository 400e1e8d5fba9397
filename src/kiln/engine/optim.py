"""Optimizers, the learning-rate schedule, gradient normalisation and the explicit L2/L1 terms."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from kiln.config import OptimizerSection, ScheduleSection
from kiln.errors import ConfigError

BNB_EXTRA = "bnb"


def decayed_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters that get weight decay: the matrices.

    By default a matrix is a tensor of 2+ dimensions. A model that stacks many small tensors
    along a leading dimension (the lattice's per-cell weights: a (cells, C) stack of LayerNorm
    gains is still a set of vectors) names its matrices with ``decayed_parameters()``.
    """
    named = getattr(model, "decayed_parameters", None)
    if callable(named):
        return {id(p) for p in named()}
    return {id(p) for p in model.parameters() if p.ndim >= 2}


def build_optimizer(
    model: nn.Module, cfg: OptimizerSection, decayed: set[int] | None = None
) -> torch.optim.Optimizer:
    """AdamW (default), 8-bit AdamW or SGD with momentum; weight decay applies to matrices only.

    Biases, LayerNorm gains and other vectors are not decayed: shrinking them towards zero
    fights normalisation rather than regularising capacity. ``decayed`` (parameter ids) says
    which are matrices when ``model`` holds only some of a model's parameters; by default
    ``decayed_parameters(model)``.

    AdamW and SGD use torch's fused kernels (one pass over each parameter, its gradient and its
    state) where the parameters' device has them: on a CPU the step is 2-4x faster than torch's
    loop of separate element-wise ops for a GPT, about 10x for the full lattice (BENCHMARKS.md,
    "Fused optimizer steps").
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = _fused_kernels_apply(params)
    decayed = decayed_parameters(model) if decayed is None else decayed
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    if cfg.name == "adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused
    )


def _fused_kernels_apply(params: list[nn.Parameter]) -> bool | None:
    """True where torch has fused optimizer kernels for every parameter (floating point, on a
    CPU or CUDA device); None otherwise, which leaves torch's own choice."""
    usable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if params and usable else None


def _bitsandbytes() -> Any:
    """The bitsandbytes module (>= 0.50: 8-bit optimizers on CPU too), or a ConfigError."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            f"optimizer.name 'adamw8bit' needs bitsandbytes >= 0.50: pip install "
            f"'kiln-train[{BNB_EXTRA}]', or set optimizer.name: adamw"
        ) from None
    return bitsandbytes


def lr_factor(step: int, *, cfg: ScheduleSection, max_steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then the chosen decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), step)
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleSection, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_factor``; its state (step count, base lrs) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, cfg=cfg, max_steps=max_steps)
    )


def normalize_gradients(params: Iterable[nn.Parameter], eps: float = 1e-8) -> None:
    """Divide each parameter's gradient by its own L2 norm (+eps), in place.

    Every tensor then moves by a step of the same size whatever its gradient's scale, which
    keeps long unrolled rollouts (the Growing NCA recipe) from exploding or vanishing.
    """
    for p in params:
        if p.grad is not None:
            p.grad.div_(p.grad.norm() + eps)


def regularization_terms(model: nn.Module, cfg: OptimizerSection) -> dict[str, torch.Tensor]:
    """lambda_W * ||theta||^2 and lambda_sparse * ||theta||_1 over all trainable parameters.

    Only the terms whose coefficient is non-zero are computed, so the default costs nothing.
    """
    terms: dict[str, torch.Tensor] = {}
    if not (cfg.l2 or cfg.l1):
        return terms
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.l2:
        terms["l2"] = cfg.l2 * sum(p.float().pow(2).sum() for p in params)
    if cfg.l1:
        terms["l1"] = cfg.l1 * sum(p.float().abs().sum() for p in params)
    return terms
