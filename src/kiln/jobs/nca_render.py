"""Pictures of a Growing NCA: a strip of growth stages (PNG) and the growth as a GIF."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kiln.fsio import atomic_write
from kiln.models.nca import NCA, grow

GAP = 1  # cells of white between the frames of a strip


@dataclass(frozen=True)
class RenderSettings:
    """What to draw: the strip's steps, the GIF's frame interval and the pixels per cell."""

    strip_steps: tuple[int, ...]
    gif_every: int
    scale: int


def to_rgb(state: torch.Tensor) -> np.ndarray:
    """One state (C, H, W) as uint8 RGB (H, W, 3): premultiplied RGBA composited over white."""
    rgba = state[:4].detach().float().cpu().clamp(0.0, 1.0)
    rgb = 1.0 - rgba[3:] + rgba[:3]  # white * (1 - alpha) + premultiplied colour
    pixels = (rgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


def _enlarge(frame: np.ndarray, scale: int) -> Image.Image:
    return Image.fromarray(frame).resize(
        (frame.shape[1] * scale, frame.shape[0] * scale), Image.Resampling.NEAREST
    )


def render_growth(
    model: NCA,
    seed: torch.Tensor,
    settings: RenderSettings,
    generator: torch.Generator,
    out_dir: Path,
    name: str,
) -> tuple[Path, Path]:
    """Grow one pattern from ``seed`` (C, H, W); write ``<name>.png`` (strip) and ``<name>.gif``.

    Returns the two paths. The GIF shows every ``gif_every``-th step up to the strip's last.
    """
    last = max(settings.strip_steps)
    gif_steps = list(range(0, last + 1, settings.gif_every))
    wanted = sorted({*settings.strip_steps, *gif_steps})
    with torch.no_grad():
        states = grow(model, seed.unsqueeze(0), wanted, generator)
    frames = {step: to_rgb(state[0]) for step, state in states.items()}

    h, w, _ = frames[0].shape
    strip = np.full((h, len(settings.strip_steps) * (w + GAP) - GAP, 3), 255, np.uint8)
    for i, step in enumerate(settings.strip_steps):
        strip[:, i * (w + GAP) : i * (w + GAP) + w] = frames[step]
    out_dir.mkdir(parents=True, exist_ok=True)
    png, gif = out_dir / f"{name}.png", out_dir / f"{name}.gif"
    buffer = io.BytesIO()
    _enlarge(strip, settings.scale).save(buffer, format="PNG")
    atomic_write(png, buffer.getvalue())

    images = [_enlarge(frames[step], settings.scale) for step in gif_steps]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=40, loop=0
    )
    atomic_write(gif, buffer.getvalue())
    return png, gif
