"""Chunk files on disk and the manifest that commits a step.

Each chunk version is written as new files, never in place: ``<chunk>.<part>.v<version>``
where part ``w`` holds the weights and part ``s`` the optimizer state, in the safetensors
layout (8-byte header length, JSON header, raw little-endian data), so any safetensors reader
opens them. A file is written to a temporary name, fsynced and renamed; ``commit`` fsyncs the
folder and then atomically replaces ``MANIFEST.json`` - the one commit point, listing for every
chunk part its file, version, size and CRC-32 - and only then deletes files the manifest no
longer names. A kill at any instant therefore leaves the previous manifest and every file it
names intact; leftovers of an interrupted step are swept when the store is opened again.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.errors import CheckpointError
from kiln.fsio import atomic_write, fsync_path
from kiln.state_codec import decode_state, encode_state
from kiln.streaming.memory import mapped_empty

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 1
_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}
_IO_BLOCK = 8 << 20


@dataclass(frozen=True)
class PartRecord:
    """One file of a chunk version, as the manifest lists it."""

    file: str
    version: int
    nbytes: int
    crc32: int


def _header(tensors: dict[str, torch.Tensor]) -> bytes:
    entries: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        entries[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _drop_pages(fd: int) -> None:
    """Ask the kernel to forget the file's cached pages (they are clean after fsync)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_part(path: Path, tensors: dict[str, torch.Tensor], *, drop_cache: bool) -> PartRecord:
    """Write ``tensors`` durably to ``path`` (temp file, fsync, rename); the folder is unsynced."""
    tmp = path.with_name(path.name + ".tmp")
    crc, total = 0, 0
    with open(tmp, "wb") as handle:
        for block in [memoryview(_header(tensors)), *(_raw_bytes(t) for t in tensors.values())]:
            handle.write(block)
            crc = zlib.crc32(block, crc)
            total += len(block)
        handle.flush()
        os.fsync(handle.fileno())
        if drop_cache:
            _drop_pages(handle.fileno())
    os.replace(tmp, path)
    return PartRecord(path.name, _version_of(path.name), total, crc)


def read_part(path: Path, record: PartRecord, *, drop_cache: bool) -> dict[str, torch.Tensor]:
    """Read a part into one buffer, check its size and CRC-32, return tensors viewing it."""
    buffer = mapped_empty(record.nbytes)
    view = memoryview(buffer.numpy())
    try:
        with open(path, "rb", buffering=0) as handle:
            got = 0
            while got < record.nbytes:
                n = handle.readinto(view[got : got + _IO_BLOCK])
                if not n:
                    break
                got += n
            extra = handle.read(1)
            if drop_cache:
                _drop_pages(handle.fileno())
    except OSError as exc:
        raise CheckpointError(f"cannot read chunk file {path}: {exc}") from exc
    if got != record.nbytes or extra or zlib.crc32(view) != record.crc32:
        raise CheckpointError(
            f"chunk file {path} does not match the manifest (size or CRC-32 differs): the store "
            "is corrupt. Restore it from a backup or start a new run."
        )
    (length,) = struct.unpack("<Q", bytes(view[:8]))
    header = json.loads(bytes(view[8 : 8 + length]))
    start = 8 + length
    out = {}
    for name, spec in header.items():
        lo, hi = spec["data_offsets"]
        dtype = _TORCH_DTYPES[spec["dtype"]]
        raw = buffer[start + lo : start + hi]
        if (start + lo) % dtype.itemsize:  # safetensors packs without padding: mixed dtypes
            raw = raw.clone()
        out[name] = raw.view(dtype).view(spec["shape"])
    return out


def _version_of(file: str) -> int:
    return int(file.rsplit(".v", 1)[1].split(".", 1)[0])


class ChunkStore:
    """A folder of chunk part files plus the manifest that says which versions are current."""

    def __init__(self, root: Path, *, drop_cache: bool = False) -> None:
        self.root = Path(root)
        self.drop_cache = drop_cache
        self.root.mkdir(parents=True, exist_ok=True)

    def part_path(self, chunk: int, name: str, part: str, version: int) -> Path:
        return self.root / f"c{chunk:04d}-{name}.{part}.v{version:08d}.safetensors"

    def write(
        self, chunk: int, name: str, part: str, version: int, tensors: dict[str, torch.Tensor]
    ) -> PartRecord:
        return write_part(
            self.part_path(chunk, name, part, version), tensors, drop_cache=self.drop_cache
        )

    def read(self, record: PartRecord) -> dict[str, torch.Tensor]:
        return read_part(self.root / record.file, record, drop_cache=self.drop_cache)

    def load_manifest(self) -> dict[str, Any] | None:
        """The committed manifest, or None before the first commit."""
        path = self.root / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the stream manifest {path}: {exc}") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} has an unknown format version")
        return manifest

    def commit(self, manifest: dict[str, Any]) -> None:
        """Make ``manifest`` current in one atomic replace, then delete what it does not name."""
        fsync_path(self.root)  # the renames of this step's part files reach disk first
        atomic_write(self.root / MANIFEST, json.dumps({"format_version": FORMAT_VERSION,
                                                       **manifest}))
        self.sweep(manifest)

    def sweep(self, manifest: dict[str, Any]) -> None:
        """Delete part files (and temporaries) that ``manifest`` does not name."""
        keep = {rec["file"] for rec in iter_records(manifest)}
        for path in self.root.iterdir():
            if path.name != MANIFEST and path.name not in keep and path.is_file():
                path.unlink(missing_ok=True)

    def verify(self, manifest: dict[str, Any]) -> None:
        """Check every file the manifest names (size and CRC-32); raise ``CheckpointError``."""
        for rec in iter_records(manifest):
            record = PartRecord(**rec)
            path = self.root / record.file
            if not path.is_file():
                raise CheckpointError(
                    f"chunk file {path} named by the manifest is missing: the store is damaged."
                )
            crc = 0
            with open(path, "rb") as handle:
                while block := handle.read(_IO_BLOCK):
                    crc = zlib.crc32(block, crc)
            if path.stat().st_size != record.nbytes or crc != record.crc32:
                raise CheckpointError(
                    f"chunk file {path} does not match the manifest (size or CRC-32 differs): "
                    "the store is corrupt. Restore it from a backup or start a new run."
                )


def record_dict(record: PartRecord | None) -> dict[str, Any] | None:
    return None if record is None else asdict(record)


def iter_records(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every part record of a manifest's chunk table."""
    return [rec for chunk in manifest["chunks"] for rec in chunk["parts"].values() if rec]


def encode_state_json(state: dict[str, Any]) -> dict[str, Any]:
    """Any ``state_codec``-encodable state as JSON, tensors inline as base64 (small states)."""
    tensors, skeleton = encode_state(state)
    return {
        "skeleton": skeleton,
        "tensors": {
            key: {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "data": base64.b64encode(t.contiguous().view(torch.uint8).numpy()).decode(),
            }
            for key, t in tensors.items()
        },
    }


def decode_state_json(encoded: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``encode_state_json``."""
    tensors = {}
    for key, spec in encoded["tensors"].items():
        raw = bytearray(base64.b64decode(spec["data"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0).byte()
        tensors[key] = flat.view(getattr(torch, spec["dtype"])).reshape(spec["shape"])
    return decode_state(tensors, encoded["skeleton"])
