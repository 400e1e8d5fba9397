"""Chunk part files and the manifest commit: round trips, corruption, crash leftovers."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import zlib
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.errors import CheckpointError
from kiln.streaming import store as store_module
from kiln.streaming.store import (
    MANIFEST,
    ChunkStore,
    PartRecord,
    as_image,
    decode_state_json,
    encode_state_json,
    image_of,
    record_dict,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "a.weight.step": torch.tensor(4.0),
    }


def _manifest(records: list[PartRecord]) -> dict:
    return {"chunks": [{"name": "a", "parts": {"w": record_dict(r)}} for r in records]}


def test_part_round_trips_and_is_a_safetensors_file(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    tensors = _tensors()
    record = store.write(0, "a", "w", 7, tensors)
    assert record.version == 7 and record.nbytes == (tmp_path / record.file).stat().st_size
    back = store.read(record)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    assert torch.equal(load_file(tmp_path / record.file)["a.weight"], tensors["a.weight"])


@pytest.mark.parametrize("direct_supported", [True, False], ids=["o_direct", "refused"])
def test_an_image_is_written_as_it_is_and_both_paths_give_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_supported: bool
) -> None:
    tensors = {"w": torch.randn(1000, 3), "step": torch.tensor(2.0)}
    image = as_image(tensors)
    assert image_of(image) is not None and image_of(tensors) is None
    assert all(torch.equal(image[n], t) for n, t in tensors.items())
    opened: list[bool] = []
    real_open = store_module._open_direct

    def open_direct(path: Path, flags: int) -> int | None:
        fd = real_open(path, flags) if direct_supported else None
        opened.append(fd is not None)
        return fd

    monkeypatch.setattr(store_module, "_open_direct", open_direct)
    store = ChunkStore(tmp_path)
    from_image = store.write(0, "a", "s", 1, image)
    buffered = store.write(1, "a", "s", 1, tensors)  # not an image: through the page cache
    assert opened == [direct_supported]  # only the image was offered direct I/O
    assert (tmp_path / from_image.file).read_bytes() == (tmp_path / buffered.file).read_bytes()
    assert (from_image.nbytes, from_image.checksum) == (buffered.nbytes, buffered.checksum)
    back = store.read(from_image)  # into an image: written back directly next time
    assert image_of(back) is not None and torch.equal(back["w"], tensors["w"])


def test_a_flipped_byte_or_a_torn_file_is_detected(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    record = store.write(0, "a", "w", 1, _tensors())
    path = tmp_path / record.file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        store.read(record)
    with pytest.raises(CheckpointError, match="checksum"):
        store.verify(_manifest([record]))
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="does not match"):
        store.read(record)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        store.verify(_manifest([record]))


def test_a_store_from_manifest_format_1_with_crc32_still_verifies(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    record = store.write(0, "a", "w", 1, _tensors())
    old = asdict(record)
    del old["checksum"]
    old["crc32"] = zlib.crc32((tmp_path / record.file).read_bytes())
    manifest = {"format_version": 1, "chunks": [{"name": "a", "parts": {"w": old}}]}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    loaded = store.load_manifest()
    assert loaded is not None
    store.verify(loaded)
    (rec,) = store_module.iter_records(loaded)
    assert torch.equal(store.read(PartRecord(**rec))["a.weight"], _tensors()["a.weight"])
    rec["checksum"] = store_module.checksum.crc32_digest(old["crc32"] ^ 1)
    with pytest.raises(CheckpointError, match="checksum"):
        store.verify(loaded)


def test_a_manifest_from_a_newer_kiln_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 99, "chunks": []}))
    with pytest.raises(CheckpointError, match=r"format version 99.*newer Kiln"):
        ChunkStore(tmp_path).load_manifest()


@pytest.mark.parametrize("manifest", [{"chunks": []}, [1, 2]], ids=["no_version", "not_a_dict"])
def test_a_manifest_without_a_format_version_is_refused_as_foreign(
    tmp_path: Path, manifest: object
) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="no format version: it is not a manifest Kiln"):
        ChunkStore(tmp_path).load_manifest()


def test_a_torn_manifest_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text('{"format_version": 1, "step": ')
    with pytest.raises(CheckpointError, match=r"cannot read the stream manifest .*: restore the "
                       "store from a backup or start a new run"):
        ChunkStore(tmp_path).load_manifest()


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_commit_replaces_the_manifest_then_retires_unnamed_files(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    old = store.write(0, "a", "w", 1, _tensors())
    store.commit(_manifest([old]) | {"step": 1})
    new = store.write(0, "a", "w", 2, _tensors())
    # A kill before the commit leaves the old manifest naming the old, intact file.
    assert store.load_manifest()["step"] == 1
    (tmp_path / (new.file + ".tmp")).write_bytes(b"half a chunk")
    store.commit(_manifest([new]) | {"step": 2})
    # The old version is kept under a spare name for the next write; the torn temporary goes.
    (spare,) = [name for name in _names(tmp_path) if name not in (MANIFEST, new.file)]
    assert spare.endswith(".spare")
    assert json.loads((tmp_path / MANIFEST).read_text())["step"] == 2
    store.commit(_manifest([new]) | {"step": 3})  # no write took the spare: it is deleted
    assert _names(tmp_path) == sorted([MANIFEST, new.file])


FULL_DISK_CHILD = textwrap.dedent(
    """
    import resource
    import sys
    from pathlib import Path

    import torch

    from kiln.errors import CheckpointError
    from kiln.streaming.store import ChunkStore, record_dict

    store = ChunkStore(Path(sys.argv[1]), direct=sys.argv[2] == "direct")
    old = store.write(0, "a", "w", 1, {"w": torch.zeros(10)})
    store.commit({"step": 1, "chunks": [{"name": "a", "parts": {"w": record_dict(old)}}]})
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, resource.RLIM_INFINITY))  # a full disk
    try:
        store.write(0, "a", "w", 2, {"w": torch.zeros(1_000_000)})
    except CheckpointError as exc:
        print(exc)
    """
)


@pytest.mark.parametrize("direct", ["direct", "buffered"])
def test_a_write_the_disk_refuses_raises_checkpoint_error_and_commits_nothing(
    tmp_path: Path, direct: str
) -> None:
    child = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path), direct],
                           capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 0 and "Traceback" not in child.stderr, child.stderr
    message = child.stdout.strip()
    assert message.startswith(f"cannot write chunk file {tmp_path / 'c0000-a.w.v00000002'}")
    assert os.strerror(errno.EFBIG) in message
    assert "Free disk space, or fix strategy.store_dir" in message
    manifest = ChunkStore(tmp_path).load_manifest()
    assert manifest["step"] == 1 and manifest["chunks"][0]["parts"]["w"]["version"] == 1


def test_a_manifest_write_the_disk_refuses_raises_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ChunkStore(tmp_path)
    old = store.write(0, "a", "w", 1, _tensors())
    store.commit(_manifest([old]) | {"step": 1})
    new = store.write(0, "a", "w", 2, _tensors())

    def full_disk(path: Path, data: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module, "atomic_write", full_disk)
    with pytest.raises(CheckpointError, match=rf"cannot write the stream manifest .*{MANIFEST}: "
                       rf"{os.strerror(errno.ENOSPC)}\. Free disk space"):
        store.commit(_manifest([new]) | {"step": 2})
    assert store.load_manifest()["step"] == 1 and (tmp_path / old.file).is_file()


@pytest.mark.parametrize("direct_supported", [True, False], ids=["o_direct", "refused"])
def test_a_write_overwrites_a_spare_of_its_size_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_supported: bool
) -> None:
    if not direct_supported:  # the spare is taken, then written through the page cache
        monkeypatch.setattr(store_module, "_open_direct", lambda path, flags: None)
    store = ChunkStore(tmp_path)
    image = as_image({"w": torch.randn(1000, 3), "step": torch.tensor(2.0)})
    first = store.write(0, "a", "w", 1, image)
    inode = (tmp_path / first.file).stat().st_ino
    store.commit(_manifest([first]))
    second = store.write(0, "a", "w", 2, image)
    store.commit(_manifest([second]))  # retires version 1
    other = store.write(1, "b", "w", 1, as_image({"x": torch.ones(7)}))  # another size
    assert (tmp_path / other.file).stat().st_ino != inode
    image["w"].add_(1.0)
    third = store.write(0, "a", "w", 3, image)
    assert (tmp_path / third.file).stat().st_ino == inode  # version 1's blocks, rewritten
    assert third.nbytes == (tmp_path / third.file).stat().st_size
    assert torch.equal(store.read(third)["w"], image["w"])
    store.commit(_manifest([third]))
    store.drop_spares()  # the end of a run: only what the manifest names is left
    assert _names(tmp_path) == sorted([MANIFEST, third.file])


def test_sweep_removes_leftovers_of_an_interrupted_step(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    kept = store.write(0, "a", "w", 3, _tensors())
    store.commit(_manifest([kept]))
    store.write(0, "a", "w", 4, _tensors())  # the interrupted step's new version
    (tmp_path / "c0000-a.w.v00000004.safetensors.tmp").write_bytes(b"torn")
    store.sweep(store.load_manifest())
    assert _names(tmp_path) == sorted([MANIFEST, kept.file])
    store.verify(store.load_manifest())


def test_commit_and_sweep_delete_only_the_stores_own_files(tmp_path: Path) -> None:
    # strategy.store_dir equal to run.root puts the store in the run directory itself: its
    # snapshot, log and metrics are not the store's to delete.
    foreign = ["config_snapshot.yaml", "train.log", "metrics.jsonl", "lock", "notes.safetensors"]
    for name in foreign:
        (tmp_path / name).write_text("the run's")
    store = ChunkStore(tmp_path)
    first = store.write(0, "a", "w", 1, _tensors())
    store.sweep({"chunks": []})
    store.commit(_manifest([first]))
    second = store.write(0, "a", "w", 2, _tensors())
    store.commit(_manifest([second]))
    store.write(0, "a", "w", 3, _tensors())  # an interrupted step's leftover
    (tmp_path / f".{MANIFEST}.x1y2.tmp").write_text("torn")
    store.sweep(store.load_manifest())
    store.drop_spares()
    assert _names(tmp_path) == sorted([*foreign, MANIFEST, second.file])
    assert all((tmp_path / name).read_text() == "the run's" for name in foreign)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_part_files_are_not_executable(tmp_path: Path, direct: bool) -> None:
    store = ChunkStore(tmp_path, direct=direct)
    record = store.write(0, "a", "s", 1, as_image({"w": torch.randn(1000, 3)}))
    assert (tmp_path / record.file).stat().st_mode & 0o111 == 0


def test_state_json_round_trips_rng_and_nested_values() -> None:
    state = {
        "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)},
        "progress": {"step": 5, "best": None, "loss": float("inf")},
        "empty": torch.empty(0),
    }
    back = decode_state_json(json.loads(json.dumps(encode_state_json(state))))
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["rng"]["python"] == state["rng"]["python"]
    assert back["progress"] == state["progress"]
    assert back["empty"].numel() == 0
