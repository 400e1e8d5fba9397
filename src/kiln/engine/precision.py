"""Mixed precision: autocast contexts and the fp16 loss scaler."""

from __future__ import annotations

import contextlib

import torch

from kiln.config import PrecisionSection

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(cfg: PrecisionSection, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on ``device``; a no-op context in fp32."""
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[cfg.dtype])


def build_scaler(cfg: PrecisionSection, device: torch.device) -> torch.amp.GradScaler:
    """A dynamic loss scaler, enabled only for fp16 (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(
        device.type,
        init_scale=cfg.loss_scale_init,
        growth_interval=cfg.loss_scale_growth_interval,
        enabled=cfg.dtype == "fp16",
    )
