"""A streaming run's last commit as a checkpoint: the model state assembled from its chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.checkpoint import CheckpointInfo
from kiln.config import Config
from kiln.streaming.executor import store_root
from kiln.streaming.store import MANIFEST, ChunkStore, PartRecord, decode_state_json
from kiln.streaming.versions import WEIGHTS


def committed_checkpoint(
    config: Config, run_dir: Path
) -> tuple[CheckpointInfo, dict[str, Any]] | None:
    """(info, state) of the run's committed step, as ``load_checkpoint`` returns them.

    ``state["model"]`` has the model's state-dict keys in its order (a tied key maps to the same
    tensor as its owner); every chunk file is checked against its checksum while it is read.
    None if the run is not streamed or has not committed a step yet.
    """
    root = store_root(config, Path(run_dir))
    if config.strategy.name != "streaming" or not (root / MANIFEST).is_file():
        return None
    store = ChunkStore(root)
    manifest = store.load_manifest()
    assert manifest is not None
    weights: dict[str, Any] = {}
    for chunk in manifest["chunks"]:
        weights.update(store.read(PartRecord(**chunk["parts"][WEIGHTS])))
    state = decode_state_json(manifest["state"])
    state["model"] = {key: weights[name] for key, name in manifest["state_keys"]}
    return CheckpointInfo(root / MANIFEST, manifest["step"], manifest["meta"]), state
