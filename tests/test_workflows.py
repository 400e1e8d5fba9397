"""End to end: determinism, bit-exact resume after kills, signals, OOM, corrupt checkpoints."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import torch

from kiln import workflows
from kiln.checkpoint import list_checkpoints, load_checkpoint
from kiln.config import Config
from kiln.engine.trainer import OutOfMemoryExit, Trainer
from kiln.errors import CheckpointError, RunError
from kiln.repro import software_versions
from kiln.run import SOFTWARE, read_metrics

ConfigFactory = Callable[..., Config]
_EXPORTS = itertools.count()


def exported_weights(run_dir: Path, tmp_path: Path, which: str = "latest") -> bytes:
    """model.safetensors bytes of the run's export."""
    out = tmp_path / f"export-{run_dir.name}-{which}-{next(_EXPORTS)}"
    workflows.export_run(run_dir, out, which)  # type: ignore[arg-type]
    return (out / "model.safetensors").read_bytes()


def flip_a_byte(path: Path) -> None:
    """Damage a file the way bit rot would: same size, one byte changed."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_train_writes_a_complete_run_directory(smoke_config: ConfigFactory) -> None:
    outcome = workflows.train(smoke_config(), echo=False)
    run = outcome.run_dir
    assert outcome.status == "completed" and outcome.step == 30
    assert (run / "status").read_text().strip() == "completed"
    for name in ("config_snapshot.yaml", "train.log", "metrics.jsonl", "metrics.json",
                 "tokenizer.json"):
        assert (run / name).is_file(), name
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "lr", "tokens_per_sec", "grad_norm", "memory_bytes", "loss_next_token"):
        assert all(key in r for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"]
    evals = [r for r in read_metrics(run) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert outcome.val_ppl == pytest.approx(evals[-1]["val_ppl"])
    assert outcome.report and outcome.report.startswith("sample:\ndef ")
    assert "threads" in (run / "config_snapshot.yaml").read_text()
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [10, 20, 30]


def test_identical_configs_give_byte_identical_weights(
    smoke_config: ConfigFactory, tmp_path: Path
) -> None:
    overrides = ("model.dropout=0.1", "training.grad_accum_steps=2", "training.max_steps=12")
    a = workflows.train(smoke_config(*overrides), echo=False).run_dir
    b = workflows.train(smoke_config(*overrides), echo=False).run_dir
    assert a != b
    assert exported_weights(a, tmp_path) == exported_weights(b, tmp_path)
    c = workflows.train(smoke_config(*overrides, "seed=1"), echo=False).run_dir
    assert exported_weights(a, tmp_path) != exported_weights(c, tmp_path)


def test_resume_after_corrupt_checkpoint_falls_back_and_matches(
    smoke_config: ConfigFactory, tmp_path: Path
) -> None:
    straight = workflows.train(smoke_config(), echo=False).run_dir
    broken = workflows.train(smoke_config(), echo=False).run_dir
    # Pretend the run died after step 20 was written and step 20 was then damaged on disk.
    ckpts = broken / "checkpoints"
    shutil.rmtree(ckpts / "step_00000030")
    flip_a_byte(ckpts / "step_00000020" / "state.safetensors")
    (broken / "status").write_text("interrupted\n")

    outcome = workflows.resume(broken, echo=False)
    assert outcome.status == "completed" and outcome.step == 30
    log = (broken / "train.log").read_text()
    assert "step_00000020" in log and "resumed from step_00000010" in log
    assert exported_weights(straight, tmp_path) == exported_weights(broken, tmp_path)


def test_retention_keeps_last_and_best(smoke_config: ConfigFactory) -> None:
    run = workflows.train(
        smoke_config("checkpoint.keep_last=1", "checkpoint.every_steps=5", "eval.every_steps=5"),
        echo=False,
    ).run_dir
    evals = {r["step"]: r["val_loss"] for r in read_metrics(run) if r.get("event") == "eval"}
    best = min(evals, key=evals.get)
    kept = {c.step for c in list_checkpoints(run / "checkpoints")}
    assert kept == {best, 30}
    assert workflows.load_chosen_checkpoint(run, "best")[0].step == best


def test_export_skips_a_corrupt_latest_checkpoint_and_says_so(
    smoke_config: ConfigFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = workflows.train(smoke_config(), echo=False).run_dir
    flip_a_byte(run / "checkpoints" / "step_00000030" / "state.safetensors")
    bundle = tmp_path / "bundle"
    workflows.export_run(run, bundle, "latest")
    assert '"step": 20' in (bundle / "metadata.json").read_text()
    assert "skipping checkpoint step 30" in capsys.readouterr().err


def test_export_of_the_best_skips_a_corrupt_best_for_the_next_best(
    smoke_config: ConfigFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = workflows.train(smoke_config(), echo=False).run_dir
    evals = {r["step"]: r["val_loss"] for r in read_metrics(run) if r.get("event") == "eval"}
    best, next_best = sorted(evals, key=lambda step: (evals[step], -step))[:2]
    flip_a_byte(run / "checkpoints" / f"step_{best:08d}" / "state.safetensors")
    bundle = tmp_path / "bundle"
    workflows.export_run(run, bundle, "best")
    assert json.loads((bundle / "metadata.json").read_text())["step"] == next_best
    err = capsys.readouterr().err
    assert f"skipping checkpoint step {best}" in err
    assert f"Using the next best valid checkpoint, step {next_best}" in err


def test_best_without_an_evaluated_checkpoint_exports_the_latest_and_says_so(
    smoke_config: ConfigFactory, tmp_path: Path
) -> None:
    run = workflows.train(smoke_config("eval.every_steps=0"), echo=False).run_dir
    shutil.rmtree(run / "checkpoints" / "step_00000030")  # the final one, the only one evaluated
    started = json.loads((run / SOFTWARE).read_text()) | {"torch": "2.0.0"}  # trained elsewhere
    (run / SOFTWARE).write_text(json.dumps(started))
    bundle = tmp_path / "bundle"
    workflows.export_run(run, bundle, "best")
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert (metadata["step"], metadata["selected_by"], metadata["val_loss"]) == (20, "latest", None)
    # What wrote the bundle, and what the run started with.
    assert metadata["software"] == software_versions() | {"safetensors": safetensors.__version__}
    assert metadata["trained_with"] == started


def test_an_export_from_inside_the_run_names_the_run(
    smoke_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = workflows.train(smoke_config("training.max_steps=2"), echo=False).run_dir
    monkeypatch.chdir(run)
    workflows.export_run(Path("."), tmp_path / "bundle")
    assert json.loads((tmp_path / "bundle" / "metadata.json").read_text())["run_id"] == run.name


def test_time_based_checkpoints(smoke_config: ConfigFactory) -> None:
    run = workflows.train(
        smoke_config("checkpoint.every_steps=0", "checkpoint.every_minutes=0.000001",
                     "checkpoint.keep_last=100", "training.max_steps=6"),
        echo=False,
    ).run_dir
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [1, 2, 3, 4, 5, 6]


def test_resume_of_completed_run_is_refused(smoke_config: ConfigFactory) -> None:
    run = workflows.train(smoke_config("training.max_steps=2"), echo=False).run_dir
    with pytest.raises(RunError, match="already completed"):
        workflows.resume(run, echo=False)


def test_precisions_train_and_fp16_scaler_state_is_checkpointed(
    smoke_config: ConfigFactory,
) -> None:
    for dtype in ("bf16", "fp16"):
        run = workflows.train(
            smoke_config(f"precision.dtype={dtype}", "training.max_steps=10"), echo=False
        ).run_dir
        rows = [r for r in read_metrics(run) if "loss" in r]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        state, _ = load_checkpoint(list_checkpoints(run / "checkpoints")[-1].path)
        if dtype == "fp16":
            assert state["scaler"]["scale"] > 0 and "loss_scale" in rows[-1]
        else:
            assert state["scaler"] == {}


def _flaky_memory(monkeypatch: pytest.MonkeyPatch, fits: Callable[[int, int], bool]) -> None:
    """Make the LM loss raise OutOfMemoryError when ``fits(call, micro_batch)`` is False."""
    from kiln.jobs import lm

    real = lm.weighted_token_loss
    calls = {"n": 0}

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        calls["n"] += 1
        if not fits(calls["n"], batch["tokens"].shape[0]):
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return real(model, batch)

    monkeypatch.setattr(lm, "weighted_token_loss", loss)


def test_oom_halves_micro_batch_and_keeps_the_math(
    smoke_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = smoke_config("training.max_steps=10", "training.micro_batch_size=8")
    reference = [r["loss"] for r in read_metrics(workflows.train(cfg, echo=False).run_dir)
                 if "loss" in r]
    _flaky_memory(monkeypatch, lambda _call, micro: micro <= 2)
    run = workflows.train(cfg, echo=False).run_dir
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert {r["micro_batch_size"] for r in rows} == {2}
    assert [r["loss"] for r in rows] == pytest.approx(reference, rel=1e-4)
    log = (run / "train.log").read_text()
    assert "out of memory at step 1 with micro-batch 8" in log
    assert "retrying step 1 with micro-batch 2 x 4 accumulation" in log


def test_oom_at_micro_batch_one_checkpoints_and_exits(
    smoke_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = smoke_config("training.max_steps=10", "training.micro_batch_size=2")
    _flaky_memory(monkeypatch, lambda call, _micro: call <= 6)  # steps 1-6 fit, then never
    with pytest.raises(OutOfMemoryExit, match="micro-batch 1"):
        workflows.train(cfg, echo=False)
    (run,) = (Path(cfg.run.root)).iterdir()
    assert (run / "status").read_text().strip() == "failed"
    (ckpt,) = list_checkpoints(run / "checkpoints")
    assert ckpt.step == 6
    monkeypatch.undo()
    assert workflows.resume(run, echo=False).status == "completed"


def test_config_error_exits_2_and_leaves_no_run(tmp_path: Path) -> None:
    root = tmp_path / "experiments"
    proc = _kiln("train", "--config", "smoke", "--set", f"run.root={root}",
                 "--set", "training.micro_batch_size=0")
    assert proc.returncode == 2
    assert "training.micro_batch_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not root.exists() or not any(root.iterdir())


def _kiln(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True,
                          text=True, timeout=300, check=False, **kwargs)


def _start_training(cfg_args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kiln", "train", "--config", "smoke",
                             *cfg_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, root: Path, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = list(root.glob("*/checkpoints/step_*")) if root.exists() else []
        if runs:
            return runs[0].parent.parent
        if proc.poll() is not None:
            raise AssertionError(f"training ended before a checkpoint: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


def _interruptible_args(shard_cache: Path, root: Path) -> list[str]:
    """``--set`` arguments of the run the kill-and-resume tests interrupt, under ``root``."""
    args = [f"data.cache_dir={shard_cache}", "hardware.device=cpu", "hardware.threads=2",
            "training.max_steps=200", "checkpoint.every_steps=10", "eval.every_steps=50",
            "model.dropout=0.1", "training.grad_accum_steps=2",
            # FIM and CoT draw randomness per window: resume must reproduce it too.
            "objectives.fim_rate=0.5", "objectives.cot.path=examples", f"run.root={root}"]
    return [x for a in args for x in ("--set", a)]


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory: pytest.TempPathFactory, shard_cache: Path) -> bytes:
    """The exported weights of the interruptible run trained straight through, once per module."""
    root = tmp_path_factory.mktemp("straight")
    assert _kiln("train", "--config", "smoke", *_interruptible_args(shard_cache, root)
                 ).returncode == 0
    (straight,) = root.iterdir()
    return exported_weights(straight, tmp_path_factory.mktemp("straight-export"))


def _kill_and_resume(
    tmp_path: Path, shard_cache: Path, expected_weights: bytes, seed: int, sig: int
) -> None:
    killed_root = tmp_path / "killed"
    rng = random.Random(seed)
    proc = _start_training(_interruptible_args(shard_cache, killed_root))
    run = _wait_for_checkpoint(proc, killed_root)
    time.sleep(rng.uniform(0.0, 1.0))
    assert proc.poll() is None, "training finished before the signal: lengthen the run"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert (run / "status").read_text().strip() == "interrupted"
    else:
        assert (run / "status").read_text().strip() == "running"
    resumed = _kiln("resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "status").read_text().strip() == "completed"
    assert exported_weights(run, tmp_path) == expected_weights
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == sorted(set(steps)), "metrics rows repeat after resume"


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_point_then_resume_is_byte_identical(
    tmp_path: Path, shard_cache: Path, uninterrupted_weights: bytes, seed: int
) -> None:
    _kill_and_resume(tmp_path, shard_cache, uninterrupted_weights, seed, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 12))
def test_sigkill_many_points(
    tmp_path: Path, shard_cache: Path, uninterrupted_weights: bytes, seed: int
) -> None:
    _kill_and_resume(tmp_path, shard_cache, uninterrupted_weights, seed, signal.SIGKILL)


def test_sigint_checkpoints_marks_interrupted_and_resumes(
    tmp_path: Path, shard_cache: Path, uninterrupted_weights: bytes
) -> None:
    _kill_and_resume(tmp_path, shard_cache, uninterrupted_weights, 7, signal.SIGINT)


def test_an_abrupt_interrupt_still_logs_how_to_resume(
    smoke_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second Ctrl-C raises KeyboardInterrupt at once; the run still says how to continue."""

    def second_ctrl_c(self: Trainer) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "evaluate", second_ctrl_c)
    cfg = smoke_config("training.max_steps=10", "eval.every_steps=5")
    with pytest.raises(KeyboardInterrupt):
        workflows.train(cfg, echo=False)
    (run,) = Path(cfg.run.root).iterdir()
    assert (run / "status").read_text().strip() == "interrupted"
    assert f"continue with: kiln resume {run}" in (run / "train.log").read_text()


def test_cli_runs_eval_generate_export(smoke_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = smoke_config("training.max_steps=10")
    run = workflows.train(cfg, echo=False).run_dir
    listing = _kiln("runs", str(Path(cfg.run.root)))
    assert run.name in listing.stdout and "completed" in listing.stdout
    evaluated = _kiln("eval", str(run), "--checkpoint", "best")
    assert evaluated.returncode == 0 and "val_ppl=" in evaluated.stdout
    generated = _kiln("generate", str(run), "--prompt", "class ", "--max-new-tokens", "4")
    assert generated.returncode == 0 and generated.stdout.startswith("class ")
    bundle = tmp_path / "bundle"
    assert _kiln("export", str(run), "--to", str(bundle)).returncode == 0
    assert set(os.listdir(bundle)) == {"model.safetensors", "tokenizer.json", "config.yaml",
                                       "metadata.json", "SHA256SUMS"}
    assert _kiln("export", "--verify", str(bundle)).returncode == 0
    again = _kiln("export", str(run), "--to", str(bundle))
    assert again.returncode == 2 and "never overwritten" in again.stderr
    missing = _kiln("eval", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not a kiln run directory" in missing.stderr


def test_eval_and_generate_refuse_a_snapshot_edited_to_another_model(
    smoke_config: ConfigFactory,
) -> None:
    run = workflows.train(smoke_config("training.max_steps=2"), echo=False).run_dir
    snapshot = run / "config_snapshot.yaml"
    snapshot.write_text(snapshot.read_text().replace("n_layers: 2", "n_layers: 3"))
    with pytest.raises(CheckpointError, match=r"different model config.*blocks\.2\."):
        workflows.generate(run, "def ", max_new_tokens=2)
    with pytest.raises(CheckpointError, match="different model config"):
        workflows.evaluate_run(run)


def test_a_run_trained_on_a_gpu_evaluates_and_samples_on_a_machine_without_one(
    smoke_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = workflows.train(smoke_config("training.max_steps=2"), echo=False).run_dir
    snapshot = run / "config_snapshot.yaml"  # what `hardware.device: auto` records on a GPU
    snapshot.write_text(snapshot.read_text().replace("device: cpu", "device: cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert workflows.generate(run, "def ", max_new_tokens=2).startswith("def ")
    assert workflows.evaluate_run(run, suites=["ppl"])["step"] == 2
    assert "trained on cuda and this machine has no CUDA GPU" in capsys.readouterr().err


OBJECTIVES = ("objectives.fim_rate=0.5", "objectives.cot.path=examples")


def test_fim_and_cot_train_in_one_pass_and_every_metric_is_reported(
    smoke_config: ConfigFactory, tmp_path: Path
) -> None:
    cfg = smoke_config(*OBJECTIVES, "training.max_steps=10", "eval.every_steps=5",
                       "eval.suites=[ppl,compile]", "eval.compile.prompts=4",
                       "eval.compile.max_new_tokens=8")
    outcome = workflows.train(cfg, echo=False)
    rows = read_metrics(outcome.run_dir)
    steps = [r for r in rows if "loss" in r]
    assert all({"loss_next_token", "loss_fim", "loss_cot"} <= set(r) for r in steps)
    evals = [r for r in rows if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [5, 10]
    for name in ("", "next_token_", "fim_", "cot_"):
        assert all(f"val_{name}loss" in r and f"val_{name}ppl" in r for r in evals)
    assert 0.0 <= outcome.final_eval["compile_rate"] <= 1.0
    report = json.loads((outcome.run_dir / "eval" / "00000010.json").read_text())
    assert report["compile_samples"] == 4 and len(report["compile_examples"]) == 3
    assert report["val_loss"] == outcome.val_loss


def test_fim_and_cot_runs_are_deterministic(smoke_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = smoke_config(*OBJECTIVES, "training.max_steps=6", "data.prefetch=2")
    a = workflows.train(cfg, echo=False).run_dir
    b = workflows.train(cfg, echo=False).run_dir
    assert exported_weights(a, tmp_path) == exported_weights(b, tmp_path)
    plain = workflows.train(smoke_config("training.max_steps=6"), echo=False).run_dir
    assert exported_weights(a, tmp_path) != exported_weights(plain, tmp_path)


def test_cli_eval_suites_and_infilling(smoke_config: ConfigFactory, tmp_path: Path) -> None:
    # Few, short samples per problem (each runs in its own process): this checks the command's
    # plumbing over every packaged problem, not what the model writes.
    cfg = smoke_config(*OBJECTIVES, "training.max_steps=4", "eval.passk.max_new_tokens=16",
                       "eval.passk.n=2", "eval.passk.ks=[1,2]")
    run = workflows.train(cfg, echo=False).run_dir
    refused = _kiln("eval", str(run), "--suite", "passk")
    assert refused.returncode == 2 and "--allow-code-execution" in refused.stderr
    assert _kiln("eval", str(run), "--suite", "bogus").returncode == 2
    evaluated = _kiln("eval", str(run), "--suite", "passk", "--allow-code-execution")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "pass@1=" in evaluated.stdout and "pass@2=" in evaluated.stdout
    report = json.loads((run / "eval" / "00000004.json").read_text())
    assert report["checkpoint"] == "step_00000004" and "val_loss" in report  # merged
    assert report["passk"]["num_problems"] >= 40

    infill = _kiln("generate", str(run), "--fim-prefix", "def f(x):\n", "--fim-suffix",
                   "\n    return y\n", "--max-new-tokens", "4")
    assert infill.returncode == 0, infill.stderr
    both = _kiln("generate", str(run), "--prompt", "x", "--fim-prefix", "a", "--fim-suffix", "b")
    assert both.returncode == 2 and "--fim-prefix A --fim-suffix B" in both.stderr
    half = _kiln("generate", str(run), "--fim-prefix", "a")
    assert half.returncode == 2


@pytest.mark.cuda
def test_cuda_training_is_deterministic(smoke_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = smoke_config("hardware.device=cuda", "precision.dtype=bf16", "training.max_steps=10")
    a = workflows.train(cfg, echo=False).run_dir
    b = workflows.train(cfg, echo=False).run_dir
    assert exported_weights(a, tmp_path) == exported_weights(b, tmp_path)
