"""Where a run's chunk store lives, and the run directory's record that the store has committed.

A streamed run's weights exist only in its store. If the store is moved or deleted, or
``strategy.store_dir`` changes, the run must neither start again from step 0 nor look as if it
never trained. So after its first commit a run notes in its own directory where its store is
(``STORE_RECORD``), and resume, export, eval and generate refuse a run whose note says it has
committed while its store has no manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.config import Config
from kiln.errors import CheckpointError
from kiln.fsio import atomic_write
from kiln.run import SNAPSHOT, read_metrics
from kiln.streaming.store import MANIFEST

STORE_RECORD = "stream_store.json"


def store_root(config: Config, run_dir: Path) -> Path:
    """Where a run's chunk store lives."""
    s = config.strategy
    return Path(s.store_dir).expanduser() / run_dir.name if s.store_dir else run_dir / "stream"


def note_committed(run_dir: Path, root: Path) -> None:
    """Record in ``run_dir`` that the store at ``root`` holds a committed step."""
    atomic_write(run_dir / STORE_RECORD, json.dumps({"store": str(root.resolve())}))


def _recorded_store(run_dir: Path) -> str | None:
    """The store path the run noted at its first commit, or None if it never noted one."""
    try:
        return str(json.loads((run_dir / STORE_RECORD).read_text(encoding="utf-8"))["store"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return ""  # damaged: the run did commit, but where is unknown


def refuse_a_missing_store(config: Config, run_dir: Path) -> None:
    """``CheckpointError`` if the run has committed a step but its store has no manifest.

    Runs from before the note count as committed once they have logged a step (streaming
    commits every step) and their store folder is gone.
    """
    root = store_root(config, run_dir)
    if (root / MANIFEST).is_file():
        return
    recorded = _recorded_store(run_dir)
    if recorded is None and (root.is_dir() or not read_metrics(run_dir)):
        return
    state = "does not exist" if not root.is_dir() else f"has no {MANIFEST}"
    was = f" (it was at {recorded})" if recorded and recorded != str(root.resolve()) else ""
    raise CheckpointError(
        f"run {run_dir} has trained, but its chunk store {root} {state}{was}: it was moved or "
        "deleted, or strategy.store_dir changed since (now "
        f"{config.strategy.store_dir!r}; empty: inside the run directory). Set "
        f"strategy.store_dir in {run_dir / SNAPSHOT} to the folder that holds the store (as "
        f"{run_dir.name}/{MANIFEST}), or start a new run."
    )
