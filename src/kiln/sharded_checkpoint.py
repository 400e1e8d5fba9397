"""FSDP checkpoints: model and optimizer as torch.distributed.checkpoint (DCP) shards.

An FSDP checkpoint is a regular ``kiln.checkpoint`` folder whose ``state.safetensors`` holds
everything except the model and optimizer (schedule, scaler, RNG states, data cursor, counters),
plus ``sharded/`` with DCP's files: ``.metadata`` and one ``__<rank>_0.distcp`` per rank. All
ranks write their shards into one staging folder; rank 0 then writes the rest and the manifest
(checksums of every file, shards included) and renames the folder into place. Until that rename
there is no ``step_*`` folder, so a crash never leaves a checkpoint that looks valid, and
``load_checkpoint`` verifies the shards like any other file.

DCP records each tensor's global shape, so a checkpoint loads under any world size, and
without a process group at all (``consolidated_model``: the full weights, for export).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kiln.checkpoint import save_checkpoint, staging_dir
from kiln.errors import CheckpointError
from kiln.fsio import fsync_path

SHARDED_DIR = "sharded"
SHARDED_KEYS = ("model", "optimizer")


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and optimizer's state as this rank's shards (DTensors), keyed by FQN."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Inverse of ``sharded_state``."""
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


def save_sharded(
    ckpt_root: Path, step: int, state: dict[str, Any], meta: dict, *, is_main: bool
) -> Path | None:
    """Collective: every rank writes its shards; rank 0 publishes. Returns the path on rank 0."""
    staged = staging_dir(ckpt_root, step, SHARDED_DIR)
    if is_main:
        shutil.rmtree(staged, ignore_errors=True)  # a leftover of a crashed save
        staged.mkdir(parents=True)
    dist.barrier()
    shards = {key: state[key] for key in SHARDED_KEYS}
    # Returns on every rank once rank 0 has written .metadata, i.e. once all shards exist.
    dcp.save(shards, storage_writer=dcp.FileSystemWriter(staged / SHARDED_DIR, sync_files=True))
    if not is_main:
        return None
    fsync_path(staged / SHARDED_DIR)
    rest = {k: v for k, v in state.items() if k not in SHARDED_KEYS}
    return save_checkpoint(ckpt_root, step, rest, meta, staged=staged)


def read_sharded_state(
    path: Path, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """``state`` (a loaded checkpoint) with this rank's model and optimizer shards added.

    Collective. The shards are resharded to the current world size.
    """
    _require_shards(path)
    shards = sharded_state(model, optimizer)
    dcp.load(shards, storage_reader=dcp.FileSystemReader(path / SHARDED_DIR))
    return {**state, **shards}


def consolidated_model(path: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint, read in this one process."""
    _require_shards(path)
    reader = dcp.FileSystemReader(path / SHARDED_DIR)
    prefix = "model."
    model = {
        fqn[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for fqn, meta in reader.read_metadata().state_dict_metadata.items()
        if fqn.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # DCP warns that it loads in one process, as asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def with_full_model(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """A loaded checkpoint's state with ``model`` filled in when its weights are sharded."""
    if "model" in state or not (Path(path) / SHARDED_DIR).is_dir():
        return state
    return {**state, "model": consolidated_model(Path(path))}


def _require_shards(path: Path) -> None:
    if not (Path(path) / SHARDED_DIR / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {SHARDED_DIR}/.metadata: it was not written by an FSDP "
            "run, or it is damaged. Resume it with the strategy it was trained with."
        )
