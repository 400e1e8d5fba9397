"""What each command does, end to end: config -> run -> job -> trainer -> checkpoint -> export.

The CLI only parses arguments and prints; these functions are the commands and are what tests
call directly. ``train``, ``resume`` and ``export_run`` dispatch on ``config.job``: gradient jobs
(``kiln.jobs.registry``) go through the one trainer, ``hashtron`` through its own loop
(``kiln.jobs.hashtron``).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors
import torch

from kiln.checkpoint import (
    CheckpointInfo,
    check_model_state,
    list_checkpoints,
    load_first_valid,
    load_latest_valid,
)
from kiln.config import Config, resolve_config
from kiln.engine.allocator import keep_freed_memory
from kiln.engine.distributed import (
    Local,
    check_world,
    create_run,
    global_batch_size,
    resolve_world,
    run_class,
    session,
)
from kiln.engine.rank_batches import partition
from kiln.engine.trainer import Trainer
from kiln.errors import CheckpointError, ConfigError, DataError, KilnError, RunError
from kiln.export import export_bundle
from kiln.hashtron.multitask import DEFAULT_TASKS, TaskReport, train_tasks
from kiln.hashtron.tasks import Task
from kiln.jobs.hashtron import NETWORK_FILE, HashtronLoop, load_task_for, network_file
from kiln.jobs.lm import LMJob, build_model, load_run_tokenizer
from kiln.jobs.lm_eval import require_code_execution_opt_in
from kiln.jobs.lm_sampling import infill_text, sample_text
from kiln.jobs.nca import RENDER_DIR, grid_target, render_model
from kiln.jobs.nca import build_model as build_nca_model
from kiln.jobs.registry import build_gradient_job
from kiln.repro import pin_threads, seed_everything, set_determinism, software_versions
from kiln.run import SNAPSHOT, Run, read_metrics, read_summary, started_software, write_eval
from kiln.streaming.executor import StreamedTraining
from kiln.streaming.export import committed_checkpoint
from kiln.streaming.placement import Streamed

Which = Literal["best", "latest"]


@dataclass
class TrainOutcome:
    """What `kiln train` reports at the end."""

    run_dir: Path
    status: str
    step: int
    val_loss: float | None
    val_ppl: float | None
    report: str | None
    final_eval: dict[str, float]


def resume_command(run_dir: Path, world_size: int) -> str:
    """The command that continues a run with as many processes as it had."""
    return f"kiln resume {run_dir}" + (f" --nproc {world_size}" if world_size > 1 else "")


def prepare_process(config: Config) -> torch.device:
    """Pin threads, set determinism flags and seed every RNG before anything random happens."""
    pin_threads(int(config.hardware.threads))
    if config.hardware.keep_freed_memory:
        keep_freed_memory()
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
    # A hashtron task (name, options, data files) and its layers are checked before the run
    # directory exists, as the schema checks everything else.
    task = load_task_for(config) if config.job == "hashtron" else None
    if config.job == "nca":
        grid_target(config.nca)  # a missing or unusable target image fails here
    with session(config) as placement:
        config = resolve_world(config, placement.world_size)
        check_world(config, placement.world_size)
        run = create_run(config, placement, echo=echo)
        run.log(f"run {run.id} in {run.path}")
        try:
            return _train_in(run, resume=False, hashtron_task=task, placement=placement)
        except (ConfigError, DataError):
            # Checks that need the built model or the data fail at start-up; a run that never
            # trained a step holds nothing, and an invalid config leaves no run directory.
            if placement.is_main and _never_trained(run.path):
                shutil.rmtree(run.path, ignore_errors=True)
            raise


def resume(run_dir: Path, *, echo: bool = True) -> TrainOutcome:
    """Continue a run from its latest valid checkpoint, with its snapshotted config.

    A data-parallel run may resume under another world size (see ``check_world``).
    """
    run = open_for_resume(run_dir, echo=echo)
    with session(run.config) as placement:
        check_world(run.config, placement.world_size)
        run.set_status("running")
        run.note_software_changes()
        return _train_in(run, resume=True, placement=placement)


def open_for_resume(run_dir: Path, *, echo: bool = True) -> Run:
    """Open a run that may be resumed, holding its lock: not completed, not being trained by
    another process, its input files unchanged."""
    run = run_class().open(run_dir, echo=echo)
    try:
        run.claim()
        if run.status() == "completed":
            raise RunError(f"run {run.path} is already completed; nothing to resume")
        run.check_inputs()
    except RunError:
        run.close()
        raise
    return run


def _never_trained(run_dir: Path) -> bool:
    """No metrics row and no checkpoint: the run failed before its first step."""
    checkpoints = run_dir / "checkpoints"
    return not read_metrics(run_dir) and not (checkpoints.is_dir() and any(checkpoints.iterdir()))


def _train_in(
    run: Run, *, resume: bool, hashtron_task: Task | None = None, placement: Local
) -> TrainOutcome:
    """Train in ``run`` with its job; a failure or an abort marks the run failed/interrupted."""
    try:
        if run.config.job == "hashtron":
            return _train_hashtron(run, resume=resume, task=hashtron_task)
        return _train_gradient(run, resume=resume, placement=placement)
    except BaseException as exc:
        if run.status() == "running":
            run.set_status("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        run.log(f"run ended: {type(exc).__name__}: {exc}")
        # The CLI reports only a clean stop; after a second Ctrl-C, a crash or a dead rank the
        # run itself says how to go on (a run that never trained a step has nothing to resume).
        if isinstance(exc, KeyboardInterrupt) or not _never_trained(run.path):
            run.log(f"continue with: {resume_command(run.path, placement.world_size)}")
        raise
    finally:
        run.close()


def _train_gradient(run: Run, *, resume: bool, placement: Local) -> TrainOutcome:
    """A gradient job through the one training loop, then the job's closing report."""
    config = run.config
    device = placement.device(prepare_process(config))
    run.log(
        f"device {device}, {config.hardware.threads} threads, precision "
        f"{config.precision.dtype}, seed {config.seed}, torch {torch.__version__}"
    )
    with placement.main_first():  # rank 0 builds the shared data cache, the others reuse it
        job = build_gradient_job(config, run.path, device, run.log)
    if config.strategy.name == "streaming":
        placement = Streamed(StreamedTraining(config, job, run.path, device, run.log))
    where = placement.describe()
    run.log(
        f"strategy {where['strategy']}: world size {where['world_size']}, backend "
        f"{where['backend']}, global batch {global_batch_size(config)} windows per step"
    )
    batches = job.batches = partition(job.batches, config, run, placement)
    trainer = Trainer(config, job, run, device, placement)
    try:
        if resume and not trainer.resume_from_checkpoint():
            run.log("no checkpoint yet: starting from step 0")
        batches.begin(trainer.progress.step)
        progress = trainer.fit()
    finally:
        placement.close()
        job.close()
    # Decided from the counters, not the status file, so that every rank agrees: an FSDP model
    # needs all ranks in each forward of the sample.
    completed = progress.step >= config.training.max_steps
    report = job.final_report(trainer.model) if completed else None
    _write_summary(run, progress.state_dict())
    val = progress.last_val
    return TrainOutcome(
        run.path,
        run.status(),
        progress.step,
        val.get("val_loss"),
        val.get("val_ppl"),
        report,
        val,
    )


def _train_hashtron(run: Run, *, resume: bool, task: Task | None) -> TrainOutcome:
    """The hashtron job: its own loop, one neuron per step (no gradients, no sample)."""
    loop = HashtronLoop(run, task)
    if resume and not loop.resume_from_checkpoint():
        run.log("no checkpoint yet: starting from step 0")
    summary = loop.fit()
    accuracy = {
        k: summary[k] for k in ("train_accuracy", "eval_accuracy") if summary[k] is not None
    }
    return TrainOutcome(run.path, run.status(), loop.step, None, None, None, accuracy)


def _write_summary(run: Run, progress: dict[str, Any]) -> None:
    rows = [r for r in read_metrics(run.path) if "loss" in r]
    # A non-finite loss reads back as null (or as NaN from a file written before strict JSON):
    # it is no candidate for the best loss, and None cannot be compared.
    finite = [r["loss"] for r in rows if r["loss"] is not None and math.isfinite(r["loss"])]
    val = progress.get("last_val", {})
    run.write_summary(
        {
            "run_id": run.id,
            "status": run.status(),
            "step": progress["step"],
            "tokens_seen": progress["tokens_seen"],
            "wall_time_sec": progress["wall_time"],
            "final_loss": rows[-1]["loss"] if rows else None,
            "best_loss": min(finite, default=None),
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
    while loading; a checkpoint that fails is reported on stderr and skipped for the next best
    (or the previous one, for "latest"). The model
    weights of a sharded (FSDP) checkpoint are consolidated into ``state["model"]``. A streaming
    run keeps only its last committed step, which is both its best and its latest.
    """
    if (Path(run_dir) / SNAPSHOT).is_file():
        run = Run.open(run_dir, echo=False)
        run.close()
        streamed = committed_checkpoint(run.config, run.path)
        if streamed is not None:
            return streamed
    info, state = _load_chosen(run_dir, which)
    if "model" in state:
        return info, state
    # Only FSDP checkpoints shard the weights. Their reader is imported here, since it pulls in
    # torch.distributed.checkpoint, which adds a second to every command's start.
    from kiln.sharded_checkpoint import with_full_model

    return info, with_full_model(info.path, state)


def _load_chosen(run_dir: Path, which: Which) -> tuple[CheckpointInfo, dict[str, Any]]:
    ckpt_root = Path(run_dir) / "checkpoints"
    if which == "best":
        scored = [i for i in list_checkpoints(ckpt_root) if i.meta.get("val_loss") is not None]
        if scored:
            ranked = sorted(scored, key=lambda i: (i.meta["val_loss"], -i.step))
            return load_first_valid(ranked, ckpt_root, _to_stderr, instead="next best valid")
    found = load_latest_valid(ckpt_root, warn=_to_stderr)
    if found is None:
        raise CheckpointError(f"{run_dir} has no checkpoints yet; train or resume it first")
    return found


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_trained_model(
    run_dir: Path, which: Which
) -> tuple[Run, torch.nn.Module, CheckpointInfo, torch.device]:
    """The run's model with the weights of the chosen checkpoint, ready for inference."""
    run = Run.open(run_dir, echo=False)
    if run.config.job != "lm":
        run.close()
        raise RunError(
            f"{run.path} is a {run.config.job} run: `kiln eval` and `kiln generate` work on "
            "lm runs only. A hashtron run's train and eval accuracy are in its metrics.json "
            "(and per step in metrics.jsonl); a lattice or nca run's evaluations are in "
            "metrics.jsonl and eval/<step>.json (`kiln render` draws an nca run's growth); "
            "`kiln export` writes any run's weights."
        )
    device = _prepare_inference(run)
    info, state = load_chosen_checkpoint(run.path, which)
    model = build_model(run.config, load_run_tokenizer(run.path).vocab_size)
    _load_weights(model, info, state["model"])
    return run, model.to(device).eval(), info, device


def _prepare_inference(run: Run) -> torch.device:
    """``prepare_process`` for running a trained model. The snapshot records the device the
    run trained on (``auto`` resolved); a run trained on a GPU still runs on a machine without
    one, on the CPU, rather than being refused with advice no inference command can follow."""
    if run.config.hardware.device == "cuda" and not torch.cuda.is_available():
        print(
            f"note: run {run.id} trained on cuda and this machine has no CUDA GPU; "
            "running its model on the cpu",
            file=sys.stderr,
        )
        run.config.hardware.device = "cpu"
    return prepare_process(run.config)


def _load_weights(model: torch.nn.Module, info: CheckpointInfo, weights: dict[str, Any]) -> None:
    """Load a checkpoint's weights into the model the run's snapshot describes; a snapshot
    edited since (other model settings) is a CheckpointError, as on resume, not a traceback."""
    check_model_state(info.path, model, weights)
    model.load_state_dict(weights)


def evaluate_run(
    run_dir: Path,
    which: Which = "latest",
    suites: list[str] | None = None,
    *,
    allow_code_execution: bool = False,
) -> dict[str, Any]:
    """Run evaluation suites (default: the run's ``eval.suites``) on a checkpoint.

    ``allow_code_execution`` opts in to the passk suite for this evaluation, as the run's
    ``eval.allow_code_execution`` would. Results go to ``eval/<step>.json`` and are returned.
    """
    run, model, info, device = load_trained_model(run_dir, which)
    try:
        config = run.config.model_copy(deep=True)
        config.eval.allow_code_execution |= allow_code_execution
        suites = suites or config.eval.suites
        require_code_execution_opt_in(config, suites)
        job = LMJob(config, run.path, device, lambda _msg: None)
        job.close()
        results = job.evaluator.run(model, suites, budgeted=False)
    finally:
        run.close()
    write_eval(run.path, info.step, {"checkpoint": info.path.name, **results})
    return {"step": info.step, **results}


def generate(
    run_dir: Path,
    prompt: str | None = None,
    *,
    fim: tuple[str, str] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    which: Which = "latest",
) -> str:
    """Continue ``prompt``, or with ``fim=(prefix, suffix)`` write the middle between them.

    Sampling defaults come from the run's ``sample`` section.
    """
    if (prompt is None) == (fim is None):
        raise KilnError("give either a prompt, or a FIM prefix and suffix")
    run, model, _, _ = load_trained_model(run_dir, which)
    run.close()
    s = run.config.sample
    settings = {
        "max_new_tokens": s.max_new_tokens if max_new_tokens is None else max_new_tokens,
        "temperature": s.temperature if temperature is None else temperature,
        "top_k": s.top_k,
        "seed": run.config.seed,
    }
    tokenizer = load_run_tokenizer(run.path)
    if fim is not None:
        return infill_text(model, tokenizer, *fim, **settings)
    return sample_text(model, tokenizer, prompt, **settings)


def export_run(run_dir: Path, to_dir: Path, which: Which = "best") -> Path:
    """Write the immutable export bundle of a run's best (or latest) checkpoint."""
    run_dir = Path(os.path.abspath(run_dir))  # `.` inside the run: its name is the run id
    if not (run_dir / SNAPSHOT).is_file():
        raise RunError(f"{run_dir} is not a kiln run directory ({SNAPSHOT} is missing)")
    info, state = load_chosen_checkpoint(run_dir, which)
    summary = read_summary(run_dir)
    if which == "best" and info.meta.get("val_loss") is None:
        which = "latest"  # no checkpoint was evaluated: say what was exported, not what was asked
    metadata = {
        "software": software_versions() | {"safetensors": safetensors.__version__},  # export's
        "trained_with": started_software(run_dir),  # what the run started with
        "run_id": run_dir.name,
        "checkpoint": info.path.name,
        "selected_by": which,
        "step": info.step,
    }
    config_text = (run_dir / SNAPSHOT).read_text(encoding="utf-8")
    if _run_job(run_dir) == "hashtron":
        # No validation loss: "best" falls back to the latest checkpoint (the final network).
        metadata |= {
            "job": "hashtron",
            "software": metadata["software"] | {"numpy": np.__version__},
            **{k: info.meta.get(k) for k in ("epoch", "train_accuracy", "eval_accuracy")},
        }
        files = {NETWORK_FILE: network_file(state), "config.yaml": config_text}
        return export_bundle(Path(to_dir), model_state=None, files=files, metadata=metadata)
    metadata |= {
        "tokens_seen": info.meta.get("tokens_seen"),
        "val_loss": info.meta.get("val_loss"),
        "best_val_loss": summary.get("best_val_loss"),
    }
    files = {"config.yaml": config_text}
    tokenizer = run_dir / "tokenizer.json"
    if tokenizer.is_file():  # jobs without a tokenizer (lattice) export weights and config only
        files["tokenizer.json"] = tokenizer.read_text(encoding="utf-8")
    return export_bundle(Path(to_dir), model_state=state["model"], files=files, metadata=metadata)


def render_run(run_dir: Path, which: Which = "latest") -> tuple[Path, Path]:
    """Render an nca run's checkpoint: growth strip and GIF in ``render/growth_<step>.*``."""
    run = Run.open(run_dir, echo=False)
    run.close()
    if run.config.job != "nca":
        raise RunError(f"{run.path} is a {run.config.job} run: `kiln render` draws nca runs")
    device = _prepare_inference(run)
    info, state = load_chosen_checkpoint(run.path, which)
    model = build_nca_model(run.config)
    _load_weights(model, info, state["model"])
    model = model.to(device).eval()
    return render_model(run.config, model, run.path / RENDER_DIR, f"growth_{info.step:08d}")


def _run_job(run_dir: Path) -> str:
    """The ``job`` of a run's snapshotted config."""
    run = Run.open(run_dir, echo=False)
    run.close()
    return run.config.job


# ---------------------------------------------------------------------- hashtron tasks


def hashtron_tasks(
    config: Config, tasks: list[str] | None = None, *, echo: bool = True
) -> list[TaskReport]:
    """Train each hashtron task in turn with the config's ``hashtron`` settings and seed.

    ``tasks`` (default: ``DEFAULT_TASKS``, the tasks that need no files and no extra) replaces
    ``hashtron.task.name``; each task gets its default options. No run directory is written:
    the reports are the result, one per task, and a task that fails is reported as failed
    while the others still run.
    """

    def progress(report: TaskReport) -> None:
        if echo:
            state = "ok" if report.ok else f"FAILED: {report.error}"
            print(f"task {report.task}: {state} ({report.seconds:.1f} s)", file=sys.stderr)

    return train_tasks(
        tasks or list(DEFAULT_TASKS),
        config.hashtron.to_settings(),
        config.seed,
        on_task=progress,
    )
