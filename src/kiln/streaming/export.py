"""A streaming run's last commit as a checkpoint: the model state assembled from its chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.checkpoint import CheckpointInfo
from kiln.config import Config
from kiln.errors import CheckpointError
from kiln.streaming.chunks import assemble
from kiln.streaming.location import refuse_a_missing_store, store_root
from kiln.streaming.store import MANIFEST, ChunkStore, PartRecord, decode_state_json
from kiln.streaming.versions import WEIGHTS

_READ_ATTEMPTS = 3  # commits that may overtake one read of a training run's weights


def committed_checkpoint(
    config: Config, run_dir: Path
) -> tuple[CheckpointInfo, dict[str, Any]] | None:
    """(info, state) of the run's committed step, as ``load_checkpoint`` returns them.

    ``state["model"]`` has the model's state-dict keys in its order (a tied key maps to the same
    tensor as its owner); every chunk file is checked against its checksum while it is read.
    A run that is still training may commit while its files are read: then the newer commit
    is read. None if the run is not streamed or has not committed a step yet; a
    ``CheckpointError`` if its store is missing although it has trained.
    """
    if config.strategy.name != "streaming":
        return None
    refuse_a_missing_store(config, Path(run_dir))
    root = store_root(config, Path(run_dir))
    if not (root / MANIFEST).is_file():
        return None
    store = ChunkStore(root)
    for attempt in range(_READ_ATTEMPTS):
        manifest = store.load_manifest()
        assert manifest is not None
        try:
            weights: dict[str, Any] = {}
            for chunk in manifest["chunks"]:
                weights.update(store.read(PartRecord(**chunk["parts"][WEIGHTS])))
            break
        except CheckpointError:
            # A run still training commits every step and then retires (renames, later
            # overwrites) the files the previous manifest named: read the newer commit.
            newer = store.load_manifest()
            if attempt + 1 == _READ_ATTEMPTS or newer is None or newer == manifest:
                raise
    state = decode_state_json(manifest["state"])
    weights = assemble(weights, manifest.get("pieces", {}))  # a store from before pieces has none
    state["model"] = {key: weights[name] for key, name in manifest["state_keys"]}
    return CheckpointInfo(root / MANIFEST, manifest["step"], manifest["meta"]), state
