"""Chunk files on disk and the manifest that commits a step.

Each chunk version is written as new files, never in place: ``<chunk>.<part>.v<version>``
where part ``w`` holds the weights and part ``s`` the optimizer state, in the safetensors
layout (8-byte header length, JSON header, raw little-endian data), so any safetensors reader
opens them. A file is written to a temporary name, fsynced and renamed; ``commit`` fsyncs the
folder and then atomically replaces ``MANIFEST.json`` - the one commit point, listing for every
chunk part its file, version, size and checksum (see ``checksum``) - and only then deletes
files the manifest no longer names. A kill at any instant therefore leaves the previous manifest
and every file it names intact; leftovers of an interrupted step are swept when the store is
opened again.

With direct I/O, "deletes" is really "recycles": a commit renames the files it retires to
spare names, and the next step's writes of the same size overwrite a spare instead of creating
a file. Overwriting blocks a file already owns skips the filesystem's allocation of new ones,
which on the disk measured made writes 1.5-2x faster (BENCHMARKS.md). A spare is never named by
the committed manifest, so overwriting it is as safe as deleting it; spares left by a kill are
swept on open, and ``drop_spares`` removes them when a run ends.

In memory a part is one page-aligned buffer laid out exactly like its file (its *image*): reads
fill it and the tensors view it, updates change it in place, and a write sends it back as it
is. With direct I/O (``O_DIRECT``, the default where the filesystem supports it) the disk
controller moves those bytes itself: no copy through the page cache, no cached pages that
outlive the step, and reads that really come from the disk. Tensors that are not an image (a
freshly created optimizer state, version 0 from the model) are written through the page cache.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import itertools
import json
import math
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.errors import CheckpointError
from kiln.fsio import atomic_write, fsync_path, json_text
from kiln.state_codec import decode_state, encode_state
from kiln.streaming import checksum
from kiln.streaming.memory import mapped_empty

MANIFEST = "MANIFEST.json"
LOCK = "STORE.lock"  # held by the one process that writes the store
FORMAT_VERSION = 2  # 1 listed a part's CRC-32 as "crc32"; still read
_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}
_IO_BLOCK = 8 << 20
_ALIGN = 4096  # direct I/O: buffer address, file offset and length in whole blocks
_SPARE = ".spare"  # suffix of a retired part file kept for recycling
# Every file a store creates; only these are ever deleted: the store's folder may hold other
# files (a store_dir equal to run.root makes it the run directory itself).
_OWN_FILE = re.compile(
    r"c\d{4}-.+\.\w+\.v\d{8}\.safetensors(\.tmp)?"  # part files and their temporaries
    r"|\d{8}\.spare"  # spares (_SPARE)
    r"|\.MANIFEST\.json\..+\.tmp"  # the manifest's temporary (fsio.atomic_writer)
)


@dataclass(frozen=True)
class PartRecord:
    """One file of a chunk version, as the manifest lists it."""

    file: str
    version: int
    nbytes: int
    checksum: str  # tagged digest, see ``checksum``


def _header(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors header of ``tensors`` (8-byte length, then JSON padded to 8 bytes)."""
    return _layout_header(tuple((n, t.dtype, tuple(t.shape)) for n, t in tensors.items()))


@functools.lru_cache(maxsize=4096)
def _layout_header(layout: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]) -> bytes:
    # Every step writes the same few layouts: encode each once.
    entries: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        entries[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def part_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """The size of the file ``write_part`` makes of ``tensors``."""
    return len(_header(tensors)) + sum(_nbytes(t) for t in tensors.values())


def image_size(nbytes: int) -> int:
    """Bytes of the buffer that holds an ``nbytes`` file's image (whole blocks)."""
    return -(-nbytes // _ALIGN) * _ALIGN


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _views(buffer: torch.Tensor, header: dict[str, Any], start: int) -> dict[str, torch.Tensor]:
    """The tensors a part's header describes, on ``buffer``'s storage.

    Each is a plain tensor on the storage, not a view with a base, so the storage's users are
    exactly these tensors (the cache relies on it to recycle buffers).
    """
    storage = buffer.untyped_storage()
    out = {}
    for name, spec in header.items():
        lo, _ = spec["data_offsets"]
        dtype = _TORCH_DTYPES[spec["dtype"]]
        if (start + lo) % dtype.itemsize:  # safetensors packs without padding: mixed dtypes
            hi = spec["data_offsets"][1]
            out[name] = buffer[start + lo : start + hi].clone().view(dtype).view(spec["shape"])
        else:
            out[name] = torch.empty(0, dtype=dtype).set_(
                storage, (start + lo) // dtype.itemsize, spec["shape"]
            )
    return out


def as_image(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` copied into one new page-aligned buffer laid out like their file."""
    if image_of(tensors) is not None:
        return tensors
    header = _header(tensors)
    buffer = mapped_empty(image_size(part_nbytes(tensors)))
    buffer[: len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    (length,) = struct.unpack("<Q", header[:8])
    out = _views(buffer, json.loads(header[8:]), 8 + length)
    for name, t in tensors.items():
        out[name].copy_(t)
    return out


def image_of(tensors: dict[str, torch.Tensor]) -> memoryview | None:
    """The buffer ``tensors`` view if it is their page-aligned image, else None.

    The buffer must begin with their header, hold each tensor at its offset and have room to
    round the file up to whole blocks; the file is its first ``part_nbytes(tensors)`` bytes.
    """
    if not tensors:
        return None
    header = _header(tensors)
    storage = next(iter(tensors.values())).untyped_storage()
    base, size = storage.data_ptr(), storage.nbytes()
    if base % _ALIGN or size < image_size(part_nbytes(tensors)) or storage.device.type != "cpu":
        return None
    offset = len(header)
    for t in tensors.values():
        if (
            t.untyped_storage().data_ptr() != base
            or not t.is_contiguous()
            or t.data_ptr() - base != offset
        ):
            return None
        offset += _nbytes(t)
    view = memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy()).cast("B")
    return view if view[: len(header)] == header else None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _open_direct(path: Path, flags: int) -> int | None:
    """A descriptor of ``path`` opened for direct I/O, or None where that is not supported."""
    try:
        return os.open(path, flags | os.O_DIRECT, 0o666)  # as open() creates: not executable
    except (AttributeError, OSError):  # no O_DIRECT here, or the filesystem refuses it
        return None


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def write_part(
    path: Path,
    tensors: dict[str, torch.Tensor],
    *,
    direct: bool,
    spare: Callable[[int], Path | None] = lambda nbytes: None,
) -> PartRecord:
    """Write ``tensors`` durably to ``path`` (temp file, fsync, rename); the folder is unsynced.

    An image is written with direct I/O when ``direct`` (rounded up to whole blocks, then cut
    to size), over the file ``spare(nbytes)`` returns if it returns one; anything else through
    the page cache, into a new file.
    """
    tmp = path.with_name(path.name + ".tmp")
    image = image_of(tensors) if direct else None
    fd = None
    if image is not None:
        total = part_nbytes(tensors)
        recycled = spare(total)
        if recycled is not None:
            os.replace(recycled, tmp)  # its blocks stay allocated: no O_TRUNC below
        fd = _open_direct(tmp, os.O_WRONLY | os.O_CREAT | (0 if recycled else os.O_TRUNC))
    if fd is not None:
        assert image is not None
        try:
            _write_all(fd, image[: image_size(total)])
            os.ftruncate(fd, total)
            os.fsync(fd)
        finally:
            os.close(fd)
        digest = checksum.digest([image[:total]])
    else:
        blocks = [memoryview(_header(tensors)), *(_raw_bytes(t) for t in tensors.values())]
        with open(tmp, "wb") as handle:
            for block in blocks:
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        total, digest = sum(len(b) for b in blocks), checksum.digest(blocks)
    os.replace(tmp, path)
    return PartRecord(path.name, _version_of(path.name), total, digest)


def _read_into(path: Path, view: memoryview, nbytes: int, *, direct: bool) -> tuple[int, bool]:
    """Read the file into ``view`` (whole blocks with direct I/O); (bytes read, longer?)."""
    fd = _open_direct(path, os.O_RDONLY) if direct else None
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < len(view):
            block = view[got : got + _IO_BLOCK]
            n = os.readv(fd, [block])
            got += n
            if n < len(block):  # the end of the file
                break
        return got, got > nbytes or os.fstat(fd).st_size != nbytes
    finally:
        os.close(fd)


def read_part(
    path: Path, record: PartRecord, *, direct: bool, into: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Read a part into an image buffer, check its size and checksum, return tensors viewing it.

    ``into``: the buffer to fill (``image_size(record.nbytes)`` bytes, page-aligned); default
    a new one.
    """
    buffer = mapped_empty(image_size(record.nbytes)) if into is None else into
    view = memoryview(buffer.numpy())
    try:
        got, longer = _read_into(path, view, record.nbytes, direct=direct)
    except OSError as exc:
        raise CheckpointError(f"cannot read chunk file {path}: {exc}") from exc
    if got != record.nbytes or longer or not checksum.matches(view[:got], record.checksum):
        raise CheckpointError(
            f"chunk file {path} does not match the manifest (size or checksum differs): the store "
            "is corrupt. Restore it from a backup or start a new run."
        )
    (length,) = struct.unpack("<Q", bytes(view[:8]))
    return _views(buffer, json.loads(bytes(view[8 : 8 + length])), 8 + length)


def _version_of(file: str) -> int:
    return int(file.rsplit(".v", 1)[1].split(".", 1)[0])


class ChunkStore:
    """A folder of chunk part files plus the manifest that says which versions are current."""

    def __init__(self, root: Path, *, direct: bool = True) -> None:
        self.root = Path(root)  # made by ``create``, before the first write
        self.direct = direct
        self._spares: dict[int, list[Path]] = {}  # by file size
        self._spare_names = itertools.count()
        self._lock = threading.Lock()  # spares: taken by writes, refilled by commits
        self._lock_fd: int | None = None  # the store's flock, see ``lock``

    def create(self) -> None:
        """Make the store's folder; ``CheckpointError`` if the file system refuses."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(f"the chunk store folder {self.root}", exc) from exc

    def lock(self) -> None:
        """Hold the store for this process until ``unlock`` (or its end, even by SIGKILL).

        Two runs writing one store would delete each other's files and overwrite each other's
        manifest; the run's own lock cannot tell, since a copied run directory has its own.
        """
        if self._lock_fd is not None:
            return
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"the chunk store {self.root} is in use by another kiln process: two runs with "
                "the same run id (a copied run directory?) share strategy.store_dir. Wait for "
                "the other to end, or move this run's store to another strategy.store_dir."
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        """Let another process open the store."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def part_path(self, chunk: int, name: str, part: str, version: int) -> Path:
        return self.root / f"c{chunk:04d}-{name}.{part}.v{version:08d}.safetensors"

    def write(
        self, chunk: int, name: str, part: str, version: int, tensors: dict[str, torch.Tensor]
    ) -> PartRecord:
        """Write a new version of a chunk part; ``CheckpointError`` if the disk refuses it."""
        path = self.part_path(chunk, name, part, version)
        try:
            return write_part(path, tensors, direct=self.direct, spare=self._take_spare)
        except OSError as exc:
            raise _write_error(f"chunk file {path}", exc) from exc

    def _take_spare(self, nbytes: int) -> Path | None:
        with self._lock:
            spares = self._spares.get(nbytes)
            return spares.pop() if spares else None

    def read(
        self, record: PartRecord, into: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return read_part(self.root / record.file, record, direct=self.direct, into=into)

    def shapes(self, record: PartRecord) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of a part, from its file's header (the data is not read)."""
        with open(self.root / record.file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        return {name: tuple(spec["shape"]) for name, spec in header.items()}

    def load_manifest(self) -> dict[str, Any] | None:
        """The committed manifest, or None before the first commit."""
        path = self.root / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read the stream manifest {path}: {exc}. Kiln replaces it atomically, so "
                "it was damaged or edited outside Kiln: restore the store from a backup or start "
                "a new run."
            ) from exc
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if not isinstance(version, int):
            raise CheckpointError(
                f"{path} has no format version: it is not a manifest Kiln wrote, or it was "
                "edited. Restore the store from a backup or start a new run."
            )
        if version == 1:
            for rec in iter_records(manifest):
                rec["checksum"] = checksum.crc32_digest(rec.pop("crc32"))
        elif version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format version {version}, which this Kiln does not know (it "
                f"writes {FORMAT_VERSION}); it was written by a newer Kiln."
            )
        return manifest

    def commit(self, manifest: dict[str, Any]) -> None:
        """Make ``manifest`` current in one atomic replace, then retire what it does not name.

        With direct I/O, retired part files become the spares of the next step's writes
        (renamed, not synced: a spare's name and content never matter); spares that the step
        since the last commit did not take are deleted.
        """
        try:
            fsync_path(self.root)  # the renames of this step's part files reach disk first
            atomic_write(
                self.root / MANIFEST, json_text({"format_version": FORMAT_VERSION, **manifest})
            )
        except OSError as exc:
            raise _write_error(f"the stream manifest {self.root / MANIFEST}", exc) from exc
        self._forget_spares()  # the step's writes are done: what they did not take goes
        spares: dict[int, list[Path]] = {}
        for path in self._unnamed(manifest):
            if self.direct and path.name.endswith(".safetensors"):
                spare = self.root / f"{next(self._spare_names):08d}{_SPARE}"
                spares.setdefault(path.stat().st_size, []).append(spare)
                os.replace(path, spare)
            else:  # an unused spare, a temporary of a failed write, or no direct I/O to reuse it
                path.unlink(missing_ok=True)
        with self._lock:
            self._spares = spares

    def sweep(self, manifest: dict[str, Any]) -> None:
        """Delete the store's files (part files, temporaries, spares) ``manifest`` does not name."""
        self._forget_spares()
        for path in self._unnamed(manifest):
            path.unlink(missing_ok=True)

    def drop_spares(self) -> None:
        """Delete the spare files (when no more writes will come)."""
        for path in itertools.chain.from_iterable(self._forget_spares().values()):
            path.unlink(missing_ok=True)

    def _forget_spares(self) -> dict[int, list[Path]]:
        """Stop offering the current spares to writes; returns them."""
        with self._lock:
            spares, self._spares = self._spares, {}
        return spares

    def _unnamed(self, manifest: dict[str, Any]) -> list[Path]:
        keep = {rec["file"] for rec in iter_records(manifest)}
        return [
            p
            for p in self.root.iterdir()
            if p.name not in keep and _OWN_FILE.fullmatch(p.name) and p.is_file()
        ]

    def verify(self, manifest: dict[str, Any]) -> None:
        """Check every file the manifest names (size and checksum); raise ``CheckpointError``."""
        for rec in iter_records(manifest):
            record = PartRecord(**rec)
            path = self.root / record.file
            if not path.is_file():
                raise CheckpointError(
                    f"chunk file {path} named by the manifest is missing: the store is damaged."
                )
            self.read(record)


def _write_error(what: str, exc: OSError) -> CheckpointError:
    """The error for a write the disk refused (what was committed is untouched)."""
    return CheckpointError(
        f"cannot write {what}: {exc.strerror or exc}. Free disk space, or fix strategy.store_dir "
        "to name a folder on a disk with room that Kiln can write to, then resume: what was "
        "committed is intact."
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
