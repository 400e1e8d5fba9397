"""FSDP checkpoints in one process (a process group of one): shards in the manifest, damage
detected, crashes leave nothing that looks valid, consolidation for export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kiln import workflows
from kiln.checkpoint import apply_retention, list_checkpoints, load_latest_valid, staging_dir
from kiln.config import load_config
from kiln.errors import CheckpointError
from kiln.sharded_checkpoint import SHARDED_DIR, consolidated_model, with_full_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shard_cache: Path) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    config = load_config("smoke", [
        f"run.root={root}", f"data.cache_dir={shard_cache}", "hardware.device=cpu",
        "hardware.threads=2", "strategy.name=fsdp", "training.max_steps=20",
        "eval.every_steps=0",
    ])
    outcome = workflows.train(config, echo=False)
    assert outcome.status == "completed"
    return outcome.run_dir


@pytest.fixture
def fsdp_run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run that a test may damage."""
    return Path(shutil.copytree(trained, tmp_path / trained.name))


def test_shards_are_checksummed_and_a_damaged_one_is_skipped(fsdp_run: Path) -> None:
    ckpts = fsdp_run / "checkpoints"
    assert [c.step for c in list_checkpoints(ckpts)] == [10, 20]
    shard = ckpts / "step_00000020" / SHARDED_DIR / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    warnings: list[str] = []
    info, _ = load_latest_valid(ckpts, warnings.append)
    assert info.step == 10
    assert "__0_0.distcp: sha256" in warnings[0]


def test_an_unpublished_sharded_save_is_not_a_checkpoint(fsdp_run: Path) -> None:
    ckpts = fsdp_run / "checkpoints"
    # A crash after the shards were written but before rank 0 published them.
    staged = staging_dir(ckpts, 30, SHARDED_DIR)
    shutil.copytree(ckpts / "step_00000020" / SHARDED_DIR, staged / SHARDED_DIR)
    assert [c.step for c in list_checkpoints(ckpts)] == [10, 20]
    assert load_latest_valid(ckpts, lambda _m: None)[0].step == 20
    apply_retention(ckpts, keep_last=3, protect=set())
    assert not staged.exists()


def test_consolidated_weights_are_the_whole_model(fsdp_run: Path, tmp_path: Path) -> None:
    path = list_checkpoints(fsdp_run / "checkpoints")[-1].path
    weights = consolidated_model(path)
    bundle = workflows.export_run(fsdp_run, tmp_path / "bundle", "latest")
    from safetensors.torch import load_file

    exported = load_file(bundle / "model.safetensors")
    assert set(exported) <= set(weights)
    assert all(torch.equal(exported[k], weights[k]) for k in exported)
    state = {"model": {"x": torch.zeros(1)}}
    assert with_full_model(path, state) is state  # a consolidated state is left alone
    with pytest.raises(CheckpointError, match=r"has no sharded/\.metadata"):
        consolidated_model(tmp_path)
