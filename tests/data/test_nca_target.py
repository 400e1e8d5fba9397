"""NCA target images: the packaged default, scaling, premultiplied alpha, clear errors."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.data.nca_target import load_target, pad_target, target_path
from kiln.errors import DataError


def write_png(path: Path, pixels: np.ndarray, mode: str = "RGBA") -> Path:
    Image.fromarray(pixels.astype(np.uint8), mode=mode).save(path)
    return path


def test_default_target_is_the_packaged_40px_image() -> None:
    assert target_path("default").is_file()
    t = load_target("default", 40)
    assert t.shape == (4, 40, 40) and t.dtype == torch.float32
    assert t.min() >= 0.0 and t.max() <= 1.0
    assert (t[:3] <= t[3:] + 1e-6).all(), "colour is premultiplied by alpha"
    assert (t[3] == 0).any() and (t[3] == 1).any(), "transparent background, opaque shape"


def test_shipped_target_matches_its_generator() -> None:
    tool = Path(__file__).resolve().parents[2] / "tools" / "make_nca_target.py"
    result = subprocess.run(
        [sys.executable, str(tool), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_premultiplied_values_and_downscaling(tmp_path: Path) -> None:
    pixels = np.zeros((4, 6, 4))
    pixels[1, 2] = (200, 100, 50, 128)
    t = load_target(str(write_png(tmp_path / "a.png", pixels)), 6)
    assert t.shape == (4, 4, 6)  # (channels, height, width)
    alpha = 128 / 255
    assert torch.allclose(t[:, 1, 2], torch.tensor([200 / 255 * alpha, 100 / 255 * alpha,
                                                    50 / 255 * alpha, alpha]))
    big = np.zeros((30, 60, 4))
    big[10:20, 20:40] = 255
    small = load_target(str(write_png(tmp_path / "big.png", big)), 12)
    assert small.shape == (4, 6, 12)  # longer side scaled to 12, aspect kept
    assert small[3, 3, 6] > 0.9 and small[3, 0, 0] == 0


def test_padding_adds_empty_cells() -> None:
    t = torch.ones(4, 2, 3)
    padded = pad_target(t, 2)
    assert padded.shape == (4, 6, 7) and padded.sum() == t.sum()
    assert torch.equal(padded[:, 2:4, 2:5], t)


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda d: d / "nope.png", ["does not exist", "RGBA PNG"]),
        (lambda d: d, ["is a directory, not a PNG file"]),
        (lambda d: _text(d / "fake.png", "not an image"), ["is not a PNG file"]),
        (lambda d: _jpeg(d / "photo.png"), ["is not a PNG file"]),
        (lambda d: write_png(d / "rgb.png", np.full((8, 8, 3), 200), "RGB"),
         ["no alpha channel", "mode RGB"]),
        (lambda d: write_png(d / "tiny.png", np.full((5, 4, 4), 255)),
         ["5 pixels", "smaller than nca.target_size 8", "at most 5"]),
        (lambda d: write_png(d / "clear.png", np.zeros((8, 8, 4))), ["fully transparent"]),
        (lambda d: _truncated(d / "cut.png"), ["cannot be read as a PNG"]),
        (lambda d: _huge_header(d / "huge.png"), ["too large", "scale it down"]),
    ],
)
def test_bad_targets_are_clear_errors(tmp_path: Path, make, fragments: list[str]) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        load_target(str(path), 8)
    message = str(info.value)
    assert "nca.target" in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def _huge_header(path: Path) -> Path:
    """A small PNG whose header claims 20000 x 20000 pixels: Pillow refuses it as a bomb."""
    write_png(path, np.full((8, 8, 4), 255))
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))  # the chunk's CRC
    path.write_bytes(bytes(data))
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _jpeg(path: Path) -> Path:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="JPEG")
    return path


def _truncated(path: Path) -> Path:
    write_png(path, np.full((16, 16, 4), 255))
    path.write_bytes(path.read_bytes()[:40])
    return path
