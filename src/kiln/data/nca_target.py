"""The image a Growing NCA learns to grow: an RGBA PNG, scaled down and alpha-premultiplied.

``load_target`` checks the file before anything expensive starts: it must exist, be a PNG, have
an alpha channel, be at least ``size`` cells on its longer side and not be fully transparent.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kiln.errors import DataError

DEFAULT_TARGET = "default"
PACKAGED_TARGET = "kiln_flame.png"  # drawn by tools/make_nca_target.py
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def target_path(name: str) -> Path:
    """The file ``nca.target`` names: the packaged image for 'default', else the path."""
    if name == DEFAULT_TARGET:
        return Path(str(resources.files("kiln.data").joinpath("targets", PACKAGED_TARGET)))
    return Path(name).expanduser()


def load_target(name: str, size: int) -> torch.Tensor:
    """The target (4, h, w) in [0, 1], RGB premultiplied by alpha, longer side ``size`` cells.

    Raises ``DataError`` naming the file and what to change when it cannot be a target.
    """
    path = target_path(name)
    where = f"nca.target {str(path)!r}"
    if path.is_dir():
        raise DataError(
            f"{where} is a directory, not a PNG file; give the path of an RGBA PNG file or "
            "'default'"
        )
    if not path.is_file():
        raise DataError(f"{where} does not exist; give an RGBA PNG file or 'default'")
    with path.open("rb") as f:
        if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise DataError(f"{where} is not a PNG file; convert it to an RGBA PNG")
    try:
        with Image.open(path) as image:
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if not has_alpha:
                raise DataError(
                    f"{where} has no alpha channel (mode {image.mode}); the automaton grows "
                    "the shape its alpha draws: save it as an RGBA PNG with a transparent "
                    "background"
                )
            rgba = image.convert("RGBA")
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"{where} is too large to decode safely ({exc}); scale it down: nca.target_size "
            "cells are all the automaton uses"
        ) from None
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{where} cannot be read as a PNG: {exc}") from None
    longer = max(rgba.size)
    if longer < size:
        raise DataError(
            f"{where} is {rgba.size[0]}x{rgba.size[1]} pixels, smaller than nca.target_size "
            f"{size} on its longer side; lower nca.target_size to at most {longer} or use a "
            "larger image (images are scaled down, never up)"
        )
    if longer > size:
        scale = size / longer
        shape = (max(1, round(rgba.size[0] * scale)), max(1, round(rgba.size[1] * scale)))
        rgba = rgba.resize(shape, Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(rgba, dtype=np.float32) / 255.0)  # (h, w, 4)
    target = pixels.permute(2, 0, 1).contiguous()  # (4, h, w)
    target[:3] *= target[3:]  # premultiplied alpha, as the automaton's RGBA channels are
    if not (target[3] > 0).any():
        raise DataError(f"{where} is fully transparent: there is nothing to grow")
    return target


def pad_target(target: torch.Tensor, padding: int) -> torch.Tensor:
    """The target with ``padding`` empty cells on every side: (4, h + 2p, w + 2p)."""
    return torch.nn.functional.pad(target, (padding,) * 4)
