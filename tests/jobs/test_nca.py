"""The nca job end to end: it learns, resumes byte-exactly with its pool, renders, and checks
its inputs before a run directory exists."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kiln import cli, workflows
from kiln.checkpoint import list_checkpoints, load_checkpoint
from kiln.config import Config, load_config
from kiln.engine.trainer import OutOfMemoryExit
from kiln.errors import ConfigError, DataError, RunError
from kiln.jobs.nca import NCAJob, grid_target
from kiln.jobs.nca_pool import sample_losses
from kiln.run import Run, read_metrics


def disc_png(path: Path, size: int = 8) -> Path:
    """An opaque orange disc on a transparent background."""
    ys, xs = np.mgrid[:size, :size] + 0.5
    inside = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 <= (size / 2 - 0.5) ** 2
    pixels = np.zeros((size, size, 4), np.uint8)
    pixels[inside] = (240, 120, 30, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGBA").save(path)
    return path


def tiny(tmp_path: Path, *overrides: str) -> Config:
    """The packaged recipe shrunk to a 12 x 12 grid, short rollouts and a small pool."""
    base = [
        f"run.root={tmp_path / 'experiments'}",
        f"nca.target={disc_png(tmp_path / 'disc.png')}",
        "nca.target_size=8",
        "nca.padding=2",
        "nca.hidden=32",
        "nca.pool_size=32",
        "nca.rollout_min=8",
        "nca.rollout_max=12",
        "nca.eval_steps=[12, 24]",
        "nca.eval_samples=2",
        "nca.render_steps=[0, 12, 24]",
        "nca.render_scale=2",
        "training.max_steps=12",
        "checkpoint.every_steps=6",
        "eval.every_steps=6",
        "logging.every_steps=1",
        "logging.progress=false",
        "hardware.device=cpu",
        "hardware.threads=1",
    ]
    return load_config("nca", [*base, *overrides])


def checkpoint_state(run_dir: Path, step: int) -> dict:
    info = next(i for i in list_checkpoints(run_dir / "checkpoints") if i.step == step)
    return load_checkpoint(info.path)[0]


def test_the_packaged_config_is_the_papers_recipe() -> None:
    cfg = load_config("nca")
    assert cfg.job == "nca"
    n = cfg.nca
    assert (n.channels, n.hidden, n.fire_rate, n.alive_threshold) == (16, 128, 0.5, 0.1)
    assert (n.target_size, n.padding, n.pool_size) == (40, 16, 1024)
    assert (n.rollout_min, n.rollout_max, cfg.training.micro_batch_size) == (64, 96, 8)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.training.max_steps) == (2e-3, 0, 8000)
    assert (cfg.schedule.name, cfg.schedule.milestones, cfg.schedule.gamma) == ("step", [2000], 0.1)
    assert cfg.training.grad_normalization == "per_tensor" and cfg.training.grad_clip == 0


def test_job_trains_loss_falls_and_writes_images(tmp_path: Path) -> None:
    # Growing from the seed every time (no pool) learns fastest: a clear fall in 80 steps.
    cfg = tiny(tmp_path, "training.max_steps=80", "nca.pool_size=0", "nca.hidden=128",
               "checkpoint.every_steps=0", "eval.every_steps=0")
    outcome = workflows.train(cfg, echo=False)
    assert outcome.status == "completed" and outcome.step == 80
    rows = [r for r in read_metrics(outcome.run_dir) if r.get("event") is None]
    seed = NCAJob(cfg, tmp_path, torch.device("cpu"), lambda _m: None).batches.seed
    seed_loss = sample_losses(seed.unsqueeze(0), grid_target(cfg.nca)).item()
    # The zero-initialised update leaves the seed as it is: step 1's loss is the seed's.
    assert rows[0]["loss"] == pytest.approx(seed_loss, rel=1e-6)
    assert np.mean([r["loss"] for r in rows[-10:]]) < 0.4 * seed_loss
    assert all(r["loss_pool_diversity"] == 0.0 for r in rows)  # no pool
    ev = outcome.final_eval
    assert {"val_loss", "val_loss_at_12", "val_loss_at_24", "pool_diversity"} <= set(ev)
    assert ev["val_loss"] == max(ev["val_loss_at_12"], ev["val_loss_at_24"])
    assert ev["val_loss_at_12"] < 0.4 * seed_loss
    assert "growth strip:" in outcome.report
    for name in ("growth.png", "growth.gif"):
        with Image.open(outcome.run_dir / "render" / name) as image:
            image.verify()


def test_pool_training_logs_a_growing_pool_diversity(tmp_path: Path) -> None:
    outcome = workflows.train(tiny(tmp_path, "eval.every_steps=0"), echo=False)
    rows = [r for r in read_metrics(outcome.run_dir) if r.get("event") is None]
    diversity = [r["loss_pool_diversity"] for r in rows]
    assert diversity[0] == 0.0  # all seeds
    assert diversity[-1] > 0.01  # grown states of different ages
    assert outcome.final_eval["pool_diversity"] > 0.01


def test_resume_is_byte_exact_including_the_pool(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "nca.damage=2", "nca.pool_size=16")
    full = workflows.train(cfg, echo=False).run_dir
    # The same run stopped at step 6: its later checkpoint removed, marked interrupted.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000012")
    run = Run.open(cut, echo=False)
    run.set_status("interrupted")
    run.close()
    resumed = workflows.resume(cut, echo=False)
    assert resumed.status == "completed" and resumed.step == 12

    a, b = checkpoint_state(full, 12), checkpoint_state(cut, 12)
    assert a["loader"]["states"].shape == (16, 16, 12, 12)
    assert a["loader"]["states"].numpy().tobytes() == b["loader"]["states"].numpy().tobytes()
    assert torch.equal(a["loader"]["generator"], b["loader"]["generator"])
    for key, tensor in a["model"].items():
        assert tensor.numpy().tobytes() == b["model"][key].numpy().tobytes(), key
    # The pool really moved between steps 6 and 12, so the comparison has teeth.
    six = checkpoint_state(full, 6)
    assert not torch.equal(six["loader"]["states"], a["loader"]["states"])


def flaky_memory(monkeypatch: pytest.MonkeyPatch, fits: Callable[[int, int], bool]) -> None:
    """Raise OutOfMemoryError when ``fits(call, micro_batch)`` is False, after the rollout
    and its staged write-back: the worst moment for the pool."""
    from kiln.jobs import nca

    real = nca.sample_losses
    calls = {"n": 0}

    def losses(states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if not fits(calls["n"], states.shape[0]):
            raise torch.OutOfMemoryError("injected: out of memory")
        return real(states, target)

    monkeypatch.setattr(nca, "sample_losses", losses)


def test_an_oom_retry_returns_every_sample_to_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(tmp_path, "nca.pool_size=16")
    reference = checkpoint_state(workflows.train(cfg, echo=False).run_dir, 12)
    flaky_memory(monkeypatch, lambda _call, micro: micro <= 4)
    run_dir = workflows.train(cfg, echo=False).run_dir
    assert "retrying step 1 with micro-batch 4 x 2" in (run_dir / "train.log").read_text()
    state = checkpoint_state(run_dir, 12)
    # The same samples, masks and rollouts, cut in two: equal up to float summation order.
    assert torch.allclose(state["loader"]["states"], reference["loader"]["states"], atol=1e-4)
    assert torch.equal(state["loader"]["generator"], reference["loader"]["generator"])


def test_an_oom_failure_checkpoints_the_pool_before_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(tmp_path, "nca.pool_size=16", "training.micro_batch_size=1",
               "training.grad_accum_steps=8", "checkpoint.every_steps=4")
    reference = workflows.train(cfg, echo=False).run_dir
    # Step 5 stages two micro-batches' states, then runs out of memory at micro-batch 1.
    flaky_memory(monkeypatch, lambda call, _micro: call <= 4 * 8 + 2)
    with pytest.raises(OutOfMemoryExit):
        workflows.train(cfg, echo=False)
    (failed,) = (p for p in Path(cfg.run.root).iterdir() if p != reference)
    saved, clean = checkpoint_state(failed, 4), checkpoint_state(reference, 4)
    assert torch.equal(saved["loader"]["states"], clean["loader"]["states"])
    monkeypatch.undo()
    assert workflows.resume(failed, echo=False).status == "completed"
    a, b = checkpoint_state(reference, 12), checkpoint_state(failed, 12)
    assert torch.equal(a["loader"]["states"], b["loader"]["states"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_gradients_are_normalised_per_tensor(tmp_path: Path) -> None:
    # One plain SGD step of lr 0.5: every parameter moves by a step of norm 0.5, or not at all
    # (the hidden layer gets no gradient while the zero-initialised output layer blocks it).
    cfg = tiny(tmp_path, "training.max_steps=1", "optimizer.name=sgd", "optimizer.lr=0.5",
               "optimizer.momentum=0.0", "checkpoint.every_steps=1")
    torch.manual_seed(cfg.seed)
    before = NCAJob(cfg, tmp_path, torch.device("cpu"), lambda _m: None).model.state_dict()
    run_dir = workflows.train(cfg, echo=False).run_dir
    after = checkpoint_state(run_dir, 1)["model"]
    moved = {k: (after[k] - before[k]).norm().item() for k in before}
    assert moved["out.weight"] == pytest.approx(0.5, rel=1e-4)
    assert moved["out.bias"] == pytest.approx(0.5, rel=1e-4)
    assert moved["hidden.weight"] == 0.0


def test_cli_render_and_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = workflows.train(tiny(tmp_path, "training.max_steps=6"), echo=False).run_dir
    assert cli.main(["render", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "growth strip:" in out and "animation:" in out
    for name in ("growth_00000006.png", "growth_00000006.gif"):
        with Image.open(run_dir / "render" / name) as image:
            image.verify()
    bundle = workflows.export_run(run_dir, tmp_path / "bundle", "latest")
    assert {"model.safetensors", "config.yaml"} <= {p.name for p in bundle.iterdir()}
    assert not (bundle / "tokenizer.json").exists()


def test_render_refuses_other_jobs(smoke_config) -> None:
    cfg = smoke_config("training.max_steps=1")
    run = Run.create(cfg, echo=False)
    run.close()
    with pytest.raises(RunError, match="kiln render"):
        workflows.render_run(run.path)


def test_a_bad_target_fails_before_the_run_directory(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, f"nca.target={tmp_path / 'missing.png'}")
    with pytest.raises(DataError, match="does not exist"):
        workflows.train(cfg, echo=False)
    assert not (tmp_path / "experiments").exists()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["nca.rollout_min=100"], "nca.rollout_min (100) must be <= nca.rollout_max (96)"),
        (["nca.damage=8"], "nca.damage (8) must be below the batch"),
        (["nca.pool_size=4"], "nca.pool_size (4) must be 0 or at least the batch"),
        (["nca.pool_size=0", "nca.damage=1"], "nca.damage needs a pool"),
        (["nca.channels=3"], "nca.channels"),
        (["nca.fire_rate=0"], "nca.fire_rate"),
        (["schedule.gamma=0"], "schedule.gamma"),
        (["training.grad_normalization=global"], "training.grad_normalization"),
    ],
)
def test_bad_nca_settings_are_config_errors(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("nca", overrides)
    assert fragment in str(info.value)


@pytest.mark.cuda
def test_cuda_training_is_deterministic_and_keeps_the_pool_on_the_cpu(tmp_path: Path) -> None:
    states = []
    for name in ("a", "b"):
        cfg = tiny(tmp_path / name, "hardware.device=cuda", "precision.dtype=bf16")
        run_dir = workflows.train(cfg, echo=False).run_dir
        states.append(checkpoint_state(run_dir, 12))
    a, b = states
    assert a["loader"]["states"].device.type == "cpu"
    assert torch.equal(a["loader"]["states"], b["loader"]["states"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
