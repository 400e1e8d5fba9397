"""Shared fixtures: the smoke config aimed at temporary folders, one shard cache per session,
and a full disk."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from kiln.config import Config, load_config


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards built once per test session and reused by every run that shares the data."""
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture
def smoke_config(tmp_path: Path, shard_cache: Path) -> Callable[..., Config]:
    """Build the packaged smoke config with runs under tmp_path; extra ``key=value`` overrides."""

    def make(*overrides: str) -> Config:
        base = [
            f"run.root={tmp_path / 'experiments'}",
            f"data.cache_dir={shard_cache}",
            "hardware.device=cpu",
            "hardware.threads=2",
        ]
        return load_config("smoke", [*base, *overrides])

    return make


@pytest.fixture(params=["os", "safetensors"])
def full_disk_save_file(request: pytest.FixtureRequest) -> Callable[..., None]:
    """A stand-in for safetensors' ``save_file`` on a full disk: it writes part of the file, then
    fails as the real one does, with an OSError or with safetensors' own error for its writes."""
    error: Exception = (
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if request.param == "os"
        else SafetensorError("Error while serializing: I/O error: No space left on device (os "
                             "error 28)")
    )

    def save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 1000)
        raise error

    return save_file


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
