"""What each command does, end to end: config -> run -> job -> trainer -> checkpoint -> export.

The CLI only parses arguments and prints; these functions are the commands and are what tests
call directly.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch

import kiln
from kiln.checkpoint import (
    CheckpointInfo,
    list_checkpoints,
    load_checkpoint,
    load_latest_valid,
)
from kiln.config import Config, resolve_config
from kiln.engine.trainer import Trainer
from kiln.errors import CheckpointError, KilnError, RunError
from kiln.export import export_bundle
from kiln.jobs.lm import LMJob, build_model, load_run_tokenizer, sample_text
from kiln.repro import pin_threads, seed_everything, set_determinism
from kiln.run import SNAPSHOT, Run, read_metrics, read_summary

Which = Literal["best", "latest"]


@dataclass
class TrainOutcome:
    """What `kiln train` reports at the end."""

    run_dir: Path
    status: str
    step: int
    val_loss: float | None
    val_ppl: float | None
    sample: str | None


def prepare_process(config: Config) -> torch.device:
    """Pin threads, set determinism flags and seed every RNG before anything random happens."""
    pin_threads(int(config.hardware.threads))
    set_determinism(config.hardware.deterministic)
    seed_everything(config.seed)
    device = torch.device(config.hardware.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KilnError(
            "hardware.device is 'cuda' but torch sees no CUDA GPU; set hardware.device=cpu "
            "or auto, or install a CUDA build of torch (see README: GPU install)"
        )
    return device


def train(config: Config, *, echo: bool = True) -> TrainOutcome:
    """Start a new run of ``config`` and train it to the end (or until interrupted)."""
    config = resolve_config(config)
    run = Run.create(config, echo=echo)
    run.log(f"run {run.id} in {run.path}")
    return _train_in(run, resume=False)


def resume(run_dir: Path, *, echo: bool = True) -> TrainOutcome:
    """Continue a run from its latest valid checkpoint, with its snapshotted config."""
    run = Run.open(run_dir, echo=echo)
    if run.status() == "completed":
        raise RunError(f"run {run.path} is already completed; nothing to resume")
    run.set_status("running")
    return _train_in(run, resume=True)


def _train_in(run: Run, *, resume: bool) -> TrainOutcome:
    config = run.config
    try:
        device = prepare_process(config)
        run.log(
            f"device {device}, {config.hardware.threads} threads, precision "
            f"{config.precision.dtype}, seed {config.seed}, torch {torch.__version__}"
        )
        job = LMJob(config, run.path, device, run.log)
        trainer = Trainer(config, job, run, device)
        try:
            if resume and not trainer.resume_from_checkpoint():
                run.log("no checkpoint yet: starting from step 0")
            progress = trainer.fit()
        finally:
            job.batches.close()
        sample = None
        if run.status() == "completed" and config.sample.max_new_tokens:
            sample = sample_text(
                trainer.model,
                job.tokenizer,
                config.sample.prompt,
                max_new_tokens=config.sample.max_new_tokens,
                temperature=config.sample.temperature,
                top_k=config.sample.top_k,
                seed=config.seed,
                device=device,
            )
        _write_summary(run, progress.state_dict())
        val = progress.last_val
        return TrainOutcome(
            run.path, run.status(), progress.step, val.get("val_loss"), val.get("val_ppl"), sample
        )
    except BaseException as exc:
        if run.status() == "running":
            run.set_status("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        run.log(f"run ended: {type(exc).__name__}: {exc}")
        raise
    finally:
        run.close()


def _write_summary(run: Run, progress: dict[str, Any]) -> None:
    rows = [r for r in read_metrics(run.path) if "loss" in r]
    val = progress.get("last_val", {})
    run.write_summary(
        {
            "run_id": run.id,
            "status": run.status(),
            "step": progress["step"],
            "tokens_seen": progress["tokens_seen"],
            "wall_time_sec": progress["wall_time"],
            "final_loss": rows[-1]["loss"] if rows else None,
            "best_loss": min((r["loss"] for r in rows), default=None),
            "final_val_loss": val.get("val_loss"),
            "final_val_ppl": val.get("val_ppl"),
            "best_val_loss": progress.get("best_val_loss"),
            "best_step": progress.get("best_step"),
        }
    )


# ---------------------------------------------------------------------- after training


def load_chosen_checkpoint(run_dir: Path, which: Which) -> tuple[CheckpointInfo, dict[str, Any]]:
    """Load the best (lowest validation loss, ties to the later step) or latest valid checkpoint.

    Without any scored checkpoint, "best" falls back to the latest. Each file is verified once,
    while loading; a newer checkpoint that fails is reported on stderr and skipped.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    if which == "best":
        scored = [i for i in list_checkpoints(ckpt_root) if i.meta.get("val_loss") is not None]
        if scored:
            best = min(scored, key=lambda i: (i.meta["val_loss"], -i.step))
            state, meta = load_checkpoint(best.path)
            return CheckpointInfo(best.path, best.step, meta), state
    found = load_latest_valid(ckpt_root, warn=lambda message: print(message, file=sys.stderr))
    if found is None:
        raise CheckpointError(f"{run_dir} has no checkpoints yet; train or resume it first")
    return found


def load_trained_model(
    run_dir: Path, which: Which
) -> tuple[Run, torch.nn.Module, CheckpointInfo, torch.device]:
    """The run's model with the weights of the chosen checkpoint, ready for inference."""
    run = Run.open(run_dir, echo=False)
    device = prepare_process(run.config)
    info, state = load_chosen_checkpoint(run.path, which)
    model = build_model(run.config, load_run_tokenizer(run.path).vocab_size)
    model.load_state_dict(state["model"])
    return run, model.to(device).eval(), info, device


def evaluate_run(run_dir: Path, which: Which = "latest") -> dict[str, float]:
    """Validation loss and perplexity of the latest or best checkpoint."""
    run, model, info, device = load_trained_model(run_dir, which)
    try:
        job = LMJob(run.config, run.path, device, lambda _msg: None)
        job.batches.close()
        metrics = job.evaluate(model)
    finally:
        run.close()
    return {"step": info.step, **metrics}


def generate(
    run_dir: Path,
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    which: Which = "latest",
) -> str:
    """Continue ``prompt`` with the run's model; defaults from the run's ``sample`` section."""
    run, model, _, device = load_trained_model(run_dir, which)
    run.close()
    s = run.config.sample
    return sample_text(
        model,
        load_run_tokenizer(run.path),
        prompt,
        max_new_tokens=s.max_new_tokens if max_new_tokens is None else max_new_tokens,
        temperature=s.temperature if temperature is None else temperature,
        top_k=s.top_k,
        seed=run.config.seed,
        device=device,
    )


def export_run(run_dir: Path, to_dir: Path, which: Which = "best") -> Path:
    """Write the immutable export bundle of a run's best (or latest) checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / SNAPSHOT).is_file():
        raise RunError(f"{run_dir} is not a kiln run directory ({SNAPSHOT} is missing)")
    info, state = load_chosen_checkpoint(run_dir, which)
    summary = read_summary(run_dir)
    metadata = {
        "kiln_version": kiln.__version__,
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "python_version": platform.python_version(),
        "source_commit": _source_commit(),
        "run_id": run_dir.name,
        "checkpoint": info.path.name,
        "selected_by": which,
        "step": info.step,
        "tokens_seen": info.meta.get("tokens_seen"),
        "val_loss": info.meta.get("val_loss"),
        "best_val_loss": summary.get("best_val_loss"),
    }
    files = {
        "tokenizer.json": (run_dir / "tokenizer.json").read_text(encoding="utf-8"),
        "config.yaml": (run_dir / SNAPSHOT).read_text(encoding="utf-8"),
    }
    return export_bundle(Path(to_dir), model_state=state["model"], files=files, metadata=metadata)


def _source_commit() -> str | None:
    """The git commit of Kiln's source tree, when it is a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(kiln.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
