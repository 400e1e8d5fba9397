"""Export bundles: sealed, checksummed, reproducible, and verified against tampering."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.errors import ExportError
from kiln.export import export_bundle, verify_bundle

FILES = {"tokenizer.json": '{"vocab": {}}', "config.yaml": b"model:\n  d_model: 8\n"}
NAMES = ["SHA256SUMS", "config.yaml", "metadata.json", "model.safetensors", "tokenizer.json"]


@pytest.fixture
def out(tmp_path):
    """A folder for bundles whose read-only contents are made deletable again afterwards."""
    yield tmp_path
    for folder, _, _ in os.walk(tmp_path):
        os.chmod(folder, 0o755)


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    embedding = torch.randn(10, 8)
    # A tied head and a transposed view: both share storage, which safetensors would refuse.
    return {"embed.weight": embedding, "head.weight": embedding, "proj.weight": embedding.t()}


def export(to_dir: Path, metadata: dict | None = None) -> Path:
    return export_bundle(
        to_dir, model_state=weights(), files=FILES, metadata=metadata or {"step": 100}
    )


def unlock(file: Path) -> None:
    os.chmod(file.parent, 0o755)
    os.chmod(file, 0o644)


def test_export_then_verify(out):
    bundle = export(out / "bundle", {"step": 100, "val_loss": 1.5})

    assert verify_bundle(bundle) == NAMES[1:]
    assert sorted(p.name for p in bundle.iterdir()) == NAMES
    assert [p.name for p in out.iterdir()] == ["bundle"]  # no temp folder left beside it
    assert (bundle / "tokenizer.json").read_text() == FILES["tokenizer.json"]
    assert (bundle / "config.yaml").read_bytes() == FILES["config.yaml"]
    assert (bundle / "metadata.json").read_text() == '{\n  "step": 100,\n  "val_loss": 1.5\n}\n'
    loaded = load_file(bundle / "model.safetensors")
    assert sorted(loaded) == sorted(weights())
    for name, tensor in weights().items():
        assert torch.equal(loaded[name], tensor)
    sums = (bundle / "SHA256SUMS").read_text().splitlines()
    assert [line.split("  ")[1] for line in sums] == NAMES[1:]


def test_bundle_is_read_only(out):
    bundle = export(out / "bundle")
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o555
    for file in bundle.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o444, file


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_sha256sum_accepts_the_checksum_file(out):
    bundle = export(out / "bundle")
    result = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": OK") == 4


def test_refuses_to_overwrite_a_non_empty_folder(out):
    export(out / "bundle")
    with pytest.raises(ExportError, match=r"already exists .* Choose a new folder"):
        export(out / "bundle")
    (out / "file").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export(out / "file")
    (out / "empty").mkdir()
    assert verify_bundle(export(out / "empty")) == NAMES[1:]


def test_rejects_reserved_or_unsafe_extra_file_names(out):
    for name in ("metadata.json", "../escape", "sub/dir.txt", "with space"):
        with pytest.raises(ExportError, match="plain file names"):
            export_bundle(out / "bundle", model_state={}, files={name: "x"}, metadata={})
    assert list(out.iterdir()) == []


def test_tampered_file_is_named(out):
    bundle = export(out / "bundle")
    target = bundle / "model.safetensors"
    unlock(target)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(
        ExportError, match=r"model\.safetensors: sha256 is [0-9a-f]{64}, SHA256SUMS"
    ):
        verify_bundle(bundle)


def test_extra_and_missing_files_are_named(out):
    bundle = export(out / "bundle")
    os.chmod(bundle, 0o755)
    (bundle / "notes.txt").write_text("added later")
    (bundle / "config.yaml").unlink()
    with pytest.raises(ExportError) as caught:
        verify_bundle(bundle)
    message = str(caught.value)
    assert f"{bundle / 'config.yaml'}: missing" in message
    assert f"{bundle / 'notes.txt'}: extra file not listed in SHA256SUMS" in message


def test_missing_or_malformed_checksum_file(out):
    with pytest.raises(ExportError, match="nothing-here does not exist"):
        verify_bundle(out / "nothing-here")
    (out / "empty").mkdir()
    with pytest.raises(ExportError, match="SHA256SUMS"):
        verify_bundle(out / "empty")
    bundle = export(out / "bundle")
    unlock(bundle / "SHA256SUMS")
    (bundle / "SHA256SUMS").write_text("0" * 64 + "  ../etc/passwd\n")
    with pytest.raises(ExportError, match="line 1 is not"):
        verify_bundle(bundle)


def test_equal_weights_give_byte_identical_model_files(out):
    first = export(out / "a", {"run": "first"})
    second = export(out / "b", {"run": "second", "extra": [1, 2]})
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "metadata.json").read_bytes() != (second / "metadata.json").read_bytes()


def test_write_failure_raises_export_error_and_cleans_up(out, monkeypatch, full_disk_save_file):
    monkeypatch.setattr("kiln.export.save_file", full_disk_save_file)
    with pytest.raises(ExportError, match=r"No space left on device.*new folder"):
        export(out / "bundle")
    assert list(out.iterdir()) == []
