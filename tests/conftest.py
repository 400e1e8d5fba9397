"""Shared fixtures: the smoke config aimed at temporary folders, one shard cache per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
