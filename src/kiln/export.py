"""Immutable export bundles: weights, extra files, metadata and a ``SHA256SUMS`` list.

The weights are a torch state dict written as ``model.safetensors``; a job without one (a
hashtron network) passes ``model_state=None`` and ships its model as one of the files.

A bundle is built in a hidden sibling folder, fsynced, made read-only and only then renamed to
its final name, so it appears complete and sealed or not at all. ``SHA256SUMS`` uses the
``sha256sum`` format, so ``sha256sum -c SHA256SUMS`` inside the bundle checks it without kiln.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from kiln.errors import ExportError
from kiln.fsio import fsync_path, json_text, sha256_file

MODEL_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
SUMS_FILE = "SHA256SUMS"
_RESERVED = frozenset({MODEL_FILE, METADATA_FILE, SUMS_FILE})
# Plain names only: no folders, and nothing sha256sum would have to escape.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SUMS_LINE = re.compile(r"([0-9a-f]{64})  (" + _FILE_NAME.pattern + ")")


def export_bundle(
    to_dir: Path,
    *,
    model_state: dict[str, torch.Tensor] | None,
    files: dict[str, bytes | str],
    metadata: dict[str, Any],
) -> Path:
    """Write a sealed bundle to ``to_dir`` (which must not exist or be empty); return it.

    The bundle holds ``model.safetensors`` (unless ``model_state`` is None; no header metadata,
    so equal weights give identical bytes), each of ``files`` (str is written as UTF-8),
    ``metadata.json`` and ``SHA256SUMS``;
    files end up mode 0o444 and the folder 0o555. Raises ``ExportError`` on a bad target or name,
    or if writing fails.
    """
    to_dir = Path(to_dir)
    _check_target(to_dir)
    for name in files:
        if name in _RESERVED or not _FILE_NAME.fullmatch(name):
            raise ExportError(
                f"cannot export extra file {name!r} to {to_dir}: names must be plain file names "
                f"(letters, digits, '.', '_', '-') other than {sorted(_RESERVED)}. Rename it."
            )
    contents = {
        name: data.encode("utf-8") if isinstance(data, str) else data
        for name, data in files.items()
    }
    contents[METADATA_FILE] = (json_text(metadata, sort_keys=True, indent=2) + "\n").encode()
    tmp = to_dir.parent / f".{to_dir.name}.tmp-{os.getpid()}"
    try:
        to_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_tree(tmp)
        tmp.mkdir()
        if model_state is not None:
            tensors = {
                name: t.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
                for name, t in model_state.items()
            }
            save_file(tensors, tmp / MODEL_FILE, metadata=None)
        for name, data in contents.items():
            (tmp / name).write_bytes(data)
        names = sorted([*([MODEL_FILE] if model_state is not None else []), *contents])
        sums = "".join(f"{sha256_file(tmp / name)}  {name}\n" for name in names)
        (tmp / SUMS_FILE).write_text(sums, encoding="utf-8")
        for name in [*names, SUMS_FILE]:
            _seal(tmp / name)
        os.chmod(tmp, 0o555)
        fsync_path(tmp)
        os.replace(tmp, to_dir)  # also replaces an empty to_dir; fails if it filled up meanwhile
        fsync_path(to_dir.parent)
    except (OSError, SafetensorError) as exc:
        # SafetensorError: how save_file reports the I/O errors of its write (a full disk).
        with contextlib.suppress(OSError):
            _remove_tree(tmp)
        reason = getattr(exc, "strerror", None) or exc
        raise ExportError(
            f"could not write the export bundle to {to_dir}: {reason}. Check free "
            "disk space and permissions, then export again to a new folder."
        ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_tree(tmp)
        raise
    return to_dir


def verify_bundle(dir: Path) -> list[str]:
    """Re-check every checksum in ``dir/SHA256SUMS``; return the verified file names, sorted.

    Raises ``ExportError`` naming each missing, extra (not listed) or mismatched file.
    """
    bundle = Path(dir)
    sums_path = bundle / SUMS_FILE
    if not bundle.is_dir():
        what = "is not a folder" if bundle.exists() else "does not exist"
        raise ExportError(f"{bundle} {what}; give the folder `kiln export --to` wrote")
    try:
        lines = sums_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(
            f"cannot read {sums_path} ({exc}): {bundle} is not a complete export bundle. "
            "Export it again to a new folder."
        ) from exc
    expected: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        match = _SUMS_LINE.fullmatch(line)
        if not match:
            raise ExportError(
                f"{sums_path} line {number} is not '<sha256>  <name>': {line!r}. The bundle was "
                "modified; export it again to a new folder."
            )
        expected[match.group(2)] = match.group(1)
    problems = []
    for name, digest in sorted(expected.items()):
        file = bundle / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif (actual := sha256_file(file)) != digest:
            problems.append(f"{file}: sha256 is {actual}, SHA256SUMS says {digest}")
    for entry in sorted(bundle.iterdir()):
        if entry.name not in expected and entry.name != SUMS_FILE:
            problems.append(f"{entry}: extra file not listed in {SUMS_FILE}")
    if problems:
        raise ExportError(
            f"export bundle {bundle} failed verification:\n  - "
            + "\n  - ".join(problems)
            + "\nThe bundle was modified after export; export it again to a new folder."
        )
    return sorted(expected)


def _check_target(to_dir: Path) -> None:
    if to_dir.is_dir() and not any(to_dir.iterdir()):
        return
    if to_dir.exists() or to_dir.is_symlink():
        raise ExportError(
            f"export target {to_dir} already exists and is not an empty folder; bundles are never "
            "overwritten. Choose a new folder (or delete this one yourself)."
        )


def _seal(file: Path) -> None:
    """Make ``file`` read-only and flush its data and mode to disk."""
    os.chmod(file, 0o444)
    fsync_path(file)


def _remove_tree(path: Path) -> None:
    """Delete a half-built bundle folder, which may already be read-only."""
    if path.is_dir():
        os.chmod(path, 0o755)
        shutil.rmtree(path)
