"""Draw Kiln's packaged Growing-NCA target: a flame rising out of a brick kiln, 40 x 40 RGBA.

The picture is pure arithmetic on pixel coordinates (each shape's coverage is averaged over a
4 x 4 grid of sub-samples for smooth edges, then composited back to front), so it is the same
on every machine; Pillow only writes the PNG.

    python tools/make_nca_target.py            # rewrite src/kiln/data/targets/kiln_flame.png
    python tools/make_nca_target.py --check    # exit 1 if the shipped image's pixels differ
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

OUTPUT = Path(__file__).resolve().parents[1] / "src/kiln/data/targets/kiln_flame.png"
SIZE = 40
SUPERSAMPLE = 4

BRICK = (0.72, 0.32, 0.18)
DOORWAY = (0.20, 0.10, 0.08)
FLAME_RIM = (0.93, 0.30, 0.08)
FLAME_CORE = (1.00, 0.86, 0.30)


def sample_grid() -> tuple[np.ndarray, np.ndarray]:
    """Sub-sample centres (y, x), shaped (SIZE, SIZE, SUPERSAMPLE**2), in pixel units."""
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    sub_y, sub_x = np.meshgrid(offsets, offsets, indexing="ij")
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    y = rows[..., None] + sub_y.reshape(-1)
    x = cols[..., None] + sub_x.reshape(-1)
    return y, x


def arch(y: np.ndarray, x: np.ndarray, cx: float, base: float, radius: float) -> np.ndarray:
    """Inside a half-disc standing on the line y = base, plus a band of 3 pixels below it."""
    dome = ((x - cx) ** 2 + (y - base) ** 2 <= radius**2) & (y <= base)
    footing = (np.abs(x - cx) <= radius) & (y > base) & (y <= base + 3)
    return dome | footing


def flame(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inside a teardrop from y = 3 down to y = 24, leaning a little to the right; and heat.

    Heat is 1 on the flame's axis and falls to 0 at its rim, for the core-to-rim colour.
    """
    top, bottom = 3.0, 24.0
    v = np.clip((y - top) / (bottom - top), 0.0, 1.0)  # 0 at the tip, 1 at the base
    half_width = 9.0 * np.sin(np.pi * v**1.6) ** 0.8
    axis = 20.0 + 2.5 * (1.0 - v) ** 2  # the tip curls to the right
    inside = (y >= top) & (y <= bottom) & (np.abs(x - axis) < half_width)
    heat = np.where(inside, 1.0 - np.abs(x - axis) / np.maximum(half_width, 1e-6), 0.0)
    return inside, heat * np.clip(1.2 * v, 0.0, 1.0)


def draw() -> np.ndarray:
    """The target as uint8 RGBA (SIZE, SIZE, 4), straight (not premultiplied) alpha."""
    y, x = sample_grid()
    kiln = arch(y, x, cx=20.0, base=33.0, radius=14.0)
    door = arch(y, x, cx=20.0, base=33.0, radius=5.0)
    fire, heat = flame(y, x)
    # Back to front with the "over" operator on premultiplied colour.
    colour = np.zeros((SIZE, SIZE, 3))
    alpha = np.zeros((SIZE, SIZE))
    layers = [
        (kiln & ~door, np.broadcast_to(BRICK, (*kiln.shape, 3))),
        (door, np.broadcast_to(DOORWAY, (*door.shape, 3))),
        (fire, np.asarray(FLAME_RIM) + heat[..., None] * np.subtract(FLAME_CORE, FLAME_RIM)),
    ]
    for mask, rgb in layers:
        cover = mask.mean(axis=-1)  # (SIZE, SIZE) coverage
        mean_rgb = (rgb * mask[..., None]).sum(axis=-2) / np.maximum(mask.sum(-1), 1)[..., None]
        colour = mean_rgb * cover[..., None] + colour * (1.0 - cover[..., None])
        alpha = cover + alpha * (1.0 - cover)
    straight = colour / np.maximum(alpha, 1e-6)[..., None]
    rgba = np.concatenate((straight, alpha[..., None]), axis=-1)
    return np.round(np.clip(rgba, 0.0, 1.0) * 255.0).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    pixels = draw()
    if args.check:
        with Image.open(OUTPUT) as shipped:
            same = shipped.mode == "RGBA" and np.array_equal(np.asarray(shipped), pixels)
        if not same:
            print(f"{OUTPUT} differs from what {Path(__file__).name} draws; rerun it")
            return 1
        print(f"{OUTPUT} matches")
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGBA").save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
