"""Atomic, checksummed checkpoints with retention and validated loading.

Layout: ``<ckpt_root>/step_<8-digit step>/`` holding ``state.safetensors`` (every tensor of the
state), ``state.json`` (the skeleton from ``state_codec`` plus ``meta``) and ``manifest.json``
(written last: sizes and sha256 of every other file; an FSDP checkpoint also holds the
torch.distributed.checkpoint shards of the model and optimizer under ``sharded/``, see
``kiln.sharded_checkpoint``). A checkpoint is built in a ``.tmp-*`` sibling,
fsynced, then renamed into place, so a kill at any instant leaves either no checkpoint for that
step or a complete one. ``.tmp-*`` and ``.old-*`` folders are leftovers that retention removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kiln.errors import CheckpointError
from kiln.fsio import atomic_write, fsync_path, json_text, sha256_file
from kiln.state_codec import decode_state, encode_state

FORMAT_VERSION = 1
TENSORS_FILE = "state.safetensors"
SKELETON_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d{8,})")


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint folder; ``meta`` comes from its manifest ({} if that is unreadable)."""

    path: Path
    step: int
    meta: dict


def staging_dir(ckpt_root: Path, step: int, tag: str) -> Path:
    """The temporary folder in which several processes build the checkpoint for ``step``."""
    return Path(ckpt_root) / f".tmp-step_{step:08d}-{tag}"


def save_checkpoint(
    ckpt_root: Path, step: int, state: Any, meta: dict, *, staged: Path | None = None
) -> Path:
    """Write ``state`` and ``meta`` atomically as the checkpoint for ``step``; return its folder.

    ``staged`` is a ``staging_dir`` that already holds files written by other processes (the
    shards of a sharded checkpoint): they are checksummed in the manifest and published with
    the rest. An existing checkpoint for the same step is replaced only once the new one is
    complete. Raises ``CheckpointError`` if the files cannot be written (no temporary folder is
    left).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    ckpt_root = Path(ckpt_root)
    tensors, skeleton = encode_state(state)
    skeleton_text = json_text(
        {"format_version": FORMAT_VERSION, "meta": meta, "skeleton": skeleton}
    )
    final = ckpt_root / f"step_{step:08d}"
    tmp = staged or ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if staged is None:
            _remove_tree(tmp)
            tmp.mkdir()
        save_file(tensors, tmp / TENSORS_FILE)
        fsync_path(tmp / TENSORS_FILE)
        atomic_write(tmp / SKELETON_FILE, skeleton_text)
        names = sorted(
            f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file()
        )
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {name: _describe(tmp / name) for name in names},
            "meta": meta,
        }
        atomic_write(tmp / MANIFEST_FILE, json_text(manifest, indent=2))
        _publish(tmp, final)
    except (OSError, SafetensorError) as exc:
        # SafetensorError: how save_file reports the I/O errors of its write (a full disk).
        shutil.rmtree(tmp, ignore_errors=True)
        tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        size_mb = (tensor_bytes + len(skeleton_text)) / 1e6
        reason = getattr(exc, "strerror", None) or exc
        raise CheckpointError(
            f"could not write the checkpoint for step {step} to {final}: {reason} "
            f"(about {size_mb:.1f} MB were being written; {_free_space(ckpt_root)}). "
            "Free disk space or fix the folder's permissions, then resume: earlier checkpoints "
            "are untouched."
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(ckpt_root: Path) -> list[CheckpointInfo]:
    """Checkpoint folders under ``ckpt_root`` sorted by step, without temporary leftovers."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    infos = []
    for entry in ckpt_root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            try:
                meta = _read_manifest(entry)["meta"]
            except (CheckpointError, KeyError):
                meta = {}  # still listed, so that loading reports what is wrong with it
            if not isinstance(meta, dict):
                meta = {}
            infos.append(CheckpointInfo(entry, int(match.group(1)), meta))
    return sorted(infos, key=lambda info: info.step)


def verify_checkpoint(path: Path) -> None:
    """Raise ``CheckpointError`` unless every file listed in the manifest has its size and hash."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / MANIFEST_FILE} has format_version {manifest.get('format_version')!r}; this "
            f"kiln reads version {FORMAT_VERSION}. Use the kiln version that wrote it."
        )
    match = _STEP_DIR.fullmatch(path.name)
    if match and manifest.get("step") != int(match.group(1)):
        raise CheckpointError(
            f"{path / MANIFEST_FILE} is for step {manifest.get('step')!r}, not the folder's step "
            f"{int(match.group(1))}: the folder was renamed or copied over. Delete it."
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not {TENSORS_FILE, SKELETON_FILE} <= files.keys():
        raise CheckpointError(
            f"{path / MANIFEST_FILE} does not list {TENSORS_FILE} and {SKELETON_FILE}: the "
            "manifest is damaged. Delete this checkpoint to resume from an earlier one."
        )
    problems = [msg for name, entry in files.items() if (msg := _check_file(path, name, entry))]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is corrupt:\n  - " + "\n  - ".join(problems) + "\nDelete this "
            "checkpoint to resume from an earlier one, or restore it from a backup."
        )


def load_checkpoint(path: Path) -> tuple[Any, dict]:
    """Verify the checkpoint at ``path``, then return ``(state, meta)``."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        tensors = load_file(path / TENSORS_FILE, device="cpu")
        document = json.loads((path / SKELETON_FILE).read_text(encoding="utf-8"))
        state = decode_state(tensors, document["skeleton"])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} passed its checksums but cannot be decoded ({exc}); it was "
            "probably written by an incompatible kiln version. Resume from another checkpoint."
        ) from exc
    return state, _read_manifest(path)["meta"]


def check_model_state(path: Path, model: torch.nn.Module, weights: Mapping[str, Any]) -> None:
    """``check_shapes`` of a checkpoint's model state against ``model``'s own tensors."""

    def shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {key: tuple(value.shape) for key, value in state.items() if torch.is_tensor(value)}

    check_shapes(path, shapes(model.state_dict()), shapes(weights))


def check_shapes(
    path: Path, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> None:
    """Raise ``CheckpointError`` unless the checkpoint at ``path`` holds the model's tensors.

    Both map tensor names to shapes: ``expected`` the model's, ``found`` the checkpoint's. A
    mismatch means the checkpoint was written for another model config (an edited snapshot).
    """
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    resized = [
        f"{name} {list(found[name])} vs {list(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
    ]
    problems = [
        f"{what} {_first(names)}"
        for what, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches, checkpoint vs model:", resized),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} was written for a different model config ({'; '.join(problems)}). "
            "Restore the model settings of the run's config_snapshot.yaml, or start a new run "
            "with the new ones."
        )


def load_latest_valid(
    ckpt_root: Path, warn: Callable[[str], None]
) -> tuple[CheckpointInfo, Any] | None:
    """Load the newest checkpoint that verifies; return ``(info, state)`` or None if there is none.

    Each newer checkpoint that fails is reported through ``warn`` and skipped. Raises
    ``CheckpointError`` if checkpoints exist but none of them loads.
    """
    infos = list_checkpoints(ckpt_root)
    if not infos:
        return None
    return load_first_valid(list(reversed(infos)), ckpt_root, warn, instead="previous valid")


def load_first_valid(
    preferred: list[CheckpointInfo],
    ckpt_root: Path,
    warn: Callable[[str], None],
    *,
    instead: str,
) -> tuple[CheckpointInfo, Any]:
    """Load the first of ``preferred`` (most wanted first) that verifies.

    Each one before it that fails is reported through ``warn`` (naming the one used: the
    ``instead`` checkpoint) and skipped; ``CheckpointError`` if none loads.
    """
    failures: list[tuple[CheckpointInfo, CheckpointError]] = []
    for info in preferred:
        try:
            state, meta = load_checkpoint(info.path)
        except CheckpointError as exc:
            failures.append((info, exc))
            continue
        for bad, exc in failures:
            warn(
                f"skipping checkpoint step {bad.step} ({bad.path}): {exc}\n"
                f"Using the {instead} checkpoint, step {info.step} ({info.path}), instead."
            )
        return CheckpointInfo(info.path, info.step, meta), state
    details = "\n".join(f"- step {bad.step}: {exc}" for bad, exc in failures)
    raise CheckpointError(
        f"none of the {len(preferred)} checkpoints under {ckpt_root} can be loaded:\n{details}\n"
        "Restore a checkpoint from a backup, or start a new run in a fresh run directory."
    )


def checkpoint_due(
    step: int, every_steps: int, every_minutes: float, seconds_since_last: float
) -> bool:
    """Whether the checkpoint cadence (every N steps and/or every M minutes) asks for one now."""
    if every_steps and step % every_steps == 0:
        return True
    return bool(every_minutes) and seconds_since_last >= 60 * every_minutes


def apply_retention(ckpt_root: Path, keep_last: int, protect: set[int]) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, sparing steps in ``protect``.

    Also removes ``.tmp-*`` and ``.old-*`` folders left by interrupted saves. Returns the deleted
    paths. Each checkpoint is first renamed to an ``.old-*`` name, so an interrupted deletion
    never leaves a half-deleted folder that looks like a checkpoint.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckpt_root = Path(ckpt_root)
    infos = list_checkpoints(ckpt_root)
    keep = {info.step for info in infos[-keep_last:]} | set(protect)
    deleted = []
    for info in infos:
        if info.step not in keep:
            aside = ckpt_root / f".old-{info.path.name}-{os.getpid()}"
            _remove_tree(aside)
            os.replace(info.path, aside)
            shutil.rmtree(aside)
            deleted.append(info.path)
    if ckpt_root.is_dir():
        for entry in sorted(ckpt_root.iterdir()):
            if entry.name.startswith((".tmp-", ".old-")):
                _remove_tree(entry)
                deleted.append(entry)
        fsync_path(ckpt_root)
    return deleted


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing an older copy safely."""
    fsync_path(tmp)
    root = final.parent
    if not final.exists():
        os.replace(tmp, final)
        fsync_path(root)
        return
    aside = root / f".old-{final.name}-{os.getpid()}"
    _remove_tree(aside)
    os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(aside, final)  # put the previous checkpoint back
        raise
    fsync_path(root)
    shutil.rmtree(aside)


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{manifest_path} is missing: the checkpoint was not completely written. Delete "
            f"{path} to resume from an earlier checkpoint."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{manifest_path} cannot be read ({exc}). Delete {path} to resume from an earlier "
            "checkpoint."
        ) from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path} is not a JSON object. Delete {path}.")
    return manifest


def _check_file(path: Path, name: str, entry: Any) -> str | None:
    """Describe what is wrong with one manifest entry, or return None if the file matches."""
    file = path / name
    if not isinstance(entry, dict) or not {"sha256", "bytes"} <= entry.keys():
        return f"{file}: malformed manifest entry {entry!r}"
    if not file.is_file():
        return f"{file}: missing"
    size = file.stat().st_size
    if size != entry["bytes"]:
        return f"{file}: size is {size} bytes, manifest says {entry['bytes']}"
    actual = sha256_file(file)
    if actual != entry["sha256"]:
        return f"{file}: sha256 is {actual}, manifest says {entry['sha256']}"
    return None


def _describe(file: Path) -> dict:
    return {"sha256": sha256_file(file), "bytes": file.stat().st_size}


def _remove_tree(path: Path) -> None:
    """Delete a folder or file if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _first(items: list[str], shown: int = 3) -> str:
    """The first ``shown`` items and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 1e6:.1f} MB are free there"
    except OSError:
        return "free space unknown"
