"""Rendering a Growing NCA: colours over white, a strip PNG and a GIF that decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kiln.jobs.nca_render import GAP, RenderSettings, render_growth, to_rgb
from kiln.models.nca import NCA, NCAShape


def test_to_rgb_composites_premultiplied_colour_over_white() -> None:
    state = torch.zeros(16, 2, 2)
    state[:4, 0, 0] = torch.tensor([0.5, 0.0, 0.0, 0.5])  # half-transparent red
    state[:4, 1, 1] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # opaque blue
    state[:4, 1, 0] = torch.tensor([2.0, -1.0, 0.0, 3.0])  # out of range: clamped
    rgb = to_rgb(state)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 1].tolist() == [255, 255, 255]  # empty cell: white
    assert rgb[0, 0].tolist() == [255, 128, 128]
    assert rgb[1, 1].tolist() == [0, 0, 255]
    assert rgb[1, 0].tolist() == [255, 0, 0]


def test_render_writes_a_strip_and_an_animation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = NCA(NCAShape())
    with torch.no_grad():
        model.out.weight.normal_(0.0, 0.05)
    seed = model.seed_state(1, 10, 12)[0]
    settings = RenderSettings(strip_steps=(0, 2, 6), gif_every=2, scale=3)
    png, gif = render_growth(model, seed, settings, torch.Generator().manual_seed(1),
                             tmp_path / "render", "growth")
    with Image.open(png) as strip:
        assert strip.format == "PNG"
        assert strip.size == ((3 * (12 + GAP) - GAP) * 3, 10 * 3)
        pixels = np.asarray(strip.convert("RGB"))
    # The first frame is the seed: one dark centre cell (alpha 1, colour 0) on white.
    first = pixels[:, : 12 * 3]
    assert (first[5 * 3, 6 * 3] == 0).all()
    assert (first == 0).all(axis=-1).sum() == 9  # one cell, 3 x 3 pixels
    assert not np.array_equal(pixels[:, : 12 * 3], pixels[:, -12 * 3 :]), "the pattern grew"
    with Image.open(gif) as animation:
        assert animation.format == "GIF" and animation.n_frames == 4  # steps 0, 2, 4, 6
        assert animation.size == (12 * 3, 10 * 3)
