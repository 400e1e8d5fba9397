"""Checkpoints: round trip, integrity checks, crash safety, retention and disk-full handling."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln import checkpoint
from kiln.checkpoint import (
    apply_retention,
    list_checkpoints,
    load_checkpoint,
    load_latest_valid,
    save_checkpoint,
    verify_checkpoint,
)
from kiln.errors import CheckpointError


def training_state(seed: int = 0) -> dict:
    """What the trainer saves: model, AdamW after two steps, scheduler, RNG states, progress."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=10)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": {"scale": 65536.0, "_growth_tracker": 0},
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.RandomState(seed).get_state(),
            "python": random.Random(seed).getstate(),
        },
        "loader": {"epoch": 0, "position": 123},
        "progress": {"step": 2, "tokens_seen": 4096},
    }


def assert_state_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_state_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, where


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-")))


def flip_byte(file: Path, offset: int = -1) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def test_round_trip_of_a_realistic_state(tmp_path):
    state = training_state()
    meta = {"step": 2, "tokens_seen": 4096, "val_loss": None, "config_hash": "abc"}
    path = save_checkpoint(tmp_path, 2, state, meta)

    assert path == tmp_path / "step_00000002"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "state.json",
        "state.safetensors",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["meta"] == meta and manifest["format_version"] == 1
    assert (
        manifest["files"]["state.safetensors"]["bytes"]
        == (path / "state.safetensors").stat().st_size
    )
    assert manifest["created_at"].endswith("+00:00")
    assert json.loads((path / "state.json").read_text())["meta"] == meta
    assert list_checkpoints(tmp_path) == [checkpoint.CheckpointInfo(path, 2, meta)]
    assert leftovers(tmp_path) == []

    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    assert_state_equal(state, loaded)
    assert list(loaded["optimizer"]["state"]) == [0, 1, 2, 3]


def test_tampered_file_is_reported_and_previous_checkpoint_used(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(64)}, {"step": 1})
    newest = save_checkpoint(tmp_path, 2, {"w": torch.full((64,), 2.0)}, {"step": 2})
    flip_byte(newest / "state.safetensors")

    with pytest.raises(CheckpointError, match=r"step_00000002/state\.safetensors: sha256 is "):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match="manifest says"):
        load_checkpoint(newest)

    warnings: list[str] = []
    info, state = load_latest_valid(tmp_path, warnings.append)
    assert (info.step, info.meta) == (1, {"step": 1})
    assert torch.equal(state["w"], torch.ones(64))
    assert len(warnings) == 1
    assert "skipping checkpoint step 2" in warnings[0]
    assert "state.safetensors" in warnings[0]
    assert f"step 1 ({tmp_path / 'step_00000001'})" in warnings[0]


def test_missing_or_broken_manifest_is_listed_and_skipped(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": 1}, {"step": 1})
    no_manifest = save_checkpoint(tmp_path, 2, {"x": 2}, {"step": 2})
    (no_manifest / "manifest.json").unlink()
    garbled = save_checkpoint(tmp_path, 3, {"x": 3}, {"step": 3})
    (garbled / "manifest.json").write_text("{not json")

    assert [(i.step, i.meta) for i in list_checkpoints(tmp_path)] == [
        (1, {"step": 1}),
        (2, {}),
        (3, {}),
    ]
    with pytest.raises(CheckpointError, match=r"step_00000002/manifest\.json is missing"):
        verify_checkpoint(no_manifest)
    warnings: list[str] = []
    info, state = load_latest_valid(tmp_path, warnings.append)
    assert (info.step, state) == (1, {"x": 1})
    assert [w.split("(")[0] for w in warnings] == [
        "skipping checkpoint step 3 ",
        "skipping checkpoint step 2 ",
    ]


def test_load_latest_valid_without_any_or_without_a_valid_checkpoint(tmp_path):
    assert load_latest_valid(tmp_path / "absent", print) is None
    path = save_checkpoint(tmp_path, 5, {"x": 1}, {})
    flip_byte(path / "state.json", 0)
    with pytest.raises(
        CheckpointError, match=r"(?s)none of the 1 checkpoints .*\n- step 5: .*state\.json: sha256"
    ):
        load_latest_valid(tmp_path, print)


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(8)}, {"step": 1})

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(8)}, {"step": 2})

    assert [info.step for info in list_checkpoints(tmp_path)] == [1]
    assert leftovers(tmp_path) == []
    info, state = load_latest_valid(tmp_path, pytest.fail)
    assert info.step == 1 and torch.equal(state["w"], torch.ones(8))


def test_failed_rename_on_resave_restores_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 2, {"w": torch.ones(8)}, {"version": "old"})
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-") and Path(dst).name == "step_00000002":
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="Input/output error"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(8)}, {"version": "new"})
    monkeypatch.undo()

    state, meta = load_checkpoint(tmp_path / "step_00000002")
    assert meta == {"version": "old"} and torch.equal(state["w"], torch.ones(8))
    assert leftovers(tmp_path) == []


def test_resaving_an_existing_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, {"w": torch.ones(4)}, {"version": 1})
    path = save_checkpoint(tmp_path, 3, {"w": torch.zeros(4)}, {"version": 2})
    state, meta = load_checkpoint(path)
    assert meta == {"version": 2} and torch.equal(state["w"], torch.zeros(4))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]


def test_retention_keeps_last_k_plus_protected_and_removes_leftovers(tmp_path):
    for step in range(1, 7):
        save_checkpoint(tmp_path, step, {"step": step}, {})
    (tmp_path / ".tmp-step_00000007-4242").mkdir()
    (tmp_path / ".tmp-step_00000007-4242" / "state.safetensors").write_bytes(b"partial")
    (tmp_path / ".old-step_00000003-4242").mkdir()
    assert [info.step for info in list_checkpoints(tmp_path)] == [1, 2, 3, 4, 5, 6]

    deleted = apply_retention(tmp_path, keep_last=2, protect={2})

    assert deleted == [
        tmp_path / "step_00000001",
        tmp_path / "step_00000003",
        tmp_path / "step_00000004",
        tmp_path / ".old-step_00000003-4242",
        tmp_path / ".tmp-step_00000007-4242",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000002",
        "step_00000005",
        "step_00000006",
    ]
    assert apply_retention(tmp_path, keep_last=5, protect=set()) == []
    with pytest.raises(ValueError, match="keep_last"):
        apply_retention(tmp_path, keep_last=0, protect=set())


def test_disk_full_raises_checkpoint_error_and_leaves_no_temp_folder(
    tmp_path, monkeypatch, full_disk_save_file
):
    monkeypatch.setattr(checkpoint, "save_file", full_disk_save_file)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tmp_path, 9, {"w": torch.zeros(250_000)}, {})
    message = str(caught.value)
    assert os.strerror(errno.ENOSPC) in message
    assert str(tmp_path / "step_00000009") in message
    assert "about 1.0 MB" in message and "Free disk space" in message
    assert list(tmp_path.iterdir()) == []


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from kiln.checkpoint import save_checkpoint

    root = Path(sys.argv[1])
    state = {"w": torch.zeros(512, 512), "n": 0}
    print("ready", flush=True)
    while True:
        state["n"] += 1
        state["w"] += 1
        step = state["n"] % 3 + 1  # cycles, so kills also hit the replace-existing path
        save_checkpoint(root, step, state, {"n": state["n"]})
    """
)


def test_sigkill_at_a_random_moment_never_leaves_a_half_checkpoint(tmp_path):
    rng = random.Random(1234)
    for _ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.05, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()

        infos = list_checkpoints(tmp_path)
        for info in infos:
            verify_checkpoint(info.path)
        if infos:
            latest, state = load_latest_valid(tmp_path, pytest.fail)
            assert torch.equal(state["w"], torch.full((512, 512), float(state["n"])))
            assert latest.meta == {"n": state["n"]}
    assert list_checkpoints(tmp_path), "the child never finished a single checkpoint"
    apply_retention(tmp_path, keep_last=3, protect=set())
    assert leftovers(tmp_path) == []
