"""The run directory: id, status, human log, metrics stream and summary.

    experiments/<run_id>/
      config_snapshot.yaml   the full resolved config
      status                 running | completed | failed | interrupted
      lock                   held by the process training the run (its pid inside)
      inputs.json            SHA-256 of each input file the config names (checked on resume)
      software.json          Kiln (and its commit), torch and Python versions at the start
      train.log              human-readable log
      metrics.jsonl          one JSON object per logged step
      metrics.json           summary: final and best values, steps, tokens, wall time
      eval/<step>.json       every evaluation's results, with details that rows cannot hold
      checkpoints/           see kiln.checkpoint

The JSON files are strict JSON (``fsio.json_text``): a NaN or infinite value, such as the loss
of a diverged run, is written as null.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Literal, TextIO

import yaml

from kiln.config import Config, path_settings, validate_config
from kiln.errors import RunError
from kiln.fsio import atomic_write, json_text, sha256_file
from kiln.repro import software_versions

Status = Literal["running", "completed", "failed", "interrupted"]
SNAPSHOT = "config_snapshot.yaml"
LOCK = "lock"
INPUTS = "inputs.json"
SOFTWARE = "software.json"


def new_run_id(config: Config) -> str:
    """UTC timestamp + short hash of the config, the clock and fresh randomness."""
    now = dt.datetime.now(dt.timezone.utc)
    salt = f"{config.fingerprint()}{now.isoformat()}{os.getpid()}{secrets.token_hex(8)}"
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{hashlib.sha256(salt.encode()).hexdigest()[:6]}"
    return f"{run_id}-{config.run.name}" if config.run.name else run_id


class Run:
    """One run directory and its sinks. Create with ``Run.create`` or reopen with ``Run.open``."""

    def __init__(self, path: Path, config: Config, *, echo: bool = True) -> None:
        self.path = path
        self.config = config
        self.echo = echo
        self.checkpoints = path / "checkpoints"
        # Opened at the first write, so that commands which only read a run (export, generate)
        # work on a read-only run directory.
        self._log: TextIO | None = None
        self._metrics: TextIO | None = None
        self._lock: int | None = None

    @property
    def id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, config: Config, *, echo: bool = True) -> Run:
        """Make a fresh run directory (never reusing an existing one) and snapshot the config."""
        root = Path(config.run.root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        while True:
            path = root / new_run_id(config)
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        (path / "checkpoints").mkdir()
        atomic_write(path / SNAPSHOT, config.to_yaml())
        atomic_write(path / INPUTS, json_text(input_hashes(config), indent=2, sort_keys=True))
        atomic_write(path / SOFTWARE, json_text(software_versions(), indent=2, sort_keys=True))
        for sink in ("train.log", "metrics.jsonl"):  # there from the start, to follow them
            (path / sink).touch()
        run = cls(path, config, echo=echo)
        run.claim()
        run.set_status("running")
        return run

    @classmethod
    def open(cls, path: Path, *, echo: bool = True) -> Run:
        """Reopen an existing run from its snapshot."""
        # Absolute, so that `.` or `..` (a command run inside the run) still names the run.
        path = Path(os.path.abspath(Path(path).expanduser()))
        snapshot = path / SNAPSHOT
        if not snapshot.is_file():
            raise RunError(
                f"{path} is not a kiln run directory: {SNAPSHOT} is missing "
                "(pass the folder that `kiln train` printed, e.g. experiments/<run_id>)"
            )
        try:
            raw = yaml.safe_load(snapshot.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            what = "UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "valid YAML"
            raise RunError(
                f"{snapshot} is not {what}: {exc}. Kiln writes it once, as UTF-8 YAML; restore "
                "it from a copy, or fix the edit that broke it"
            ) from None
        return cls(path, validate_config(raw or {}), echo=echo)

    def claim(self) -> None:
        """Hold the run's lock until ``close`` or the end of this process: one trainer per run.

        An advisory ``flock`` on ``<run>/lock``. The kernel drops it when the process dies, even
        by SIGKILL, so a crashed run can always be resumed; a run that is still training cannot
        be resumed a second time beside it.
        """
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(
                f"run {self.path} is in use by another kiln process (pid {holder}); wait for it "
                "to end, or stop it, then resume"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    def check_inputs(self) -> None:
        """Refuse to resume on input files that changed since the run started: the run would go
        on training on other data without a word. Runs from before inputs.json are not checked.
        """
        try:
            recorded = json.loads((self.path / INPUTS).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError) as exc:
            raise RunError(f"cannot read {self.path / INPUTS} ({exc})") from None
        now = input_hashes(self.config)
        for key, digest in sorted(recorded.items()):
            if now.get(key) != digest:
                what = "is gone" if key not in now else "has changed"
                raise RunError(
                    f"{key} ({_path_of(self.config, key)}) {what} since run {self.id} started, "
                    "so resuming would train on other data; put the original file back, or "
                    "start a new run"
                )

    def note_software_changes(self) -> None:
        """Log a warning when the run resumes under other software than it started with: from
        here on its steps can round differently from an uninterrupted run's (README,
        Determinism). Runs from before software.json are not checked."""
        started = started_software(self.path)
        if started is None:
            return
        now = software_versions()
        changed = [f"{k} {started.get(k)} -> {v}" for k, v in sorted(now.items())
                   if started.get(k) != v]
        if changed:
            self.log(
                f"warning: resuming under other software than run {self.id} started with "
                f"({', '.join(changed)}): the steps from here can differ in their last bits from "
                "an uninterrupted run's; resume with the original versions for exact equality"
            )

    def status(self) -> str:
        """The status word, or 'unknown' if the file is missing."""
        try:
            return (self.path / "status").read_text(encoding="utf-8").strip()
        except OSError:
            return "unknown"

    def set_status(self, status: Status) -> None:
        atomic_write(self.path / "status", status + "\n")

    def log(self, message: str, *, echo: bool = True) -> None:
        """A timestamped line in train.log, echoed to stderr unless ``echo`` is False."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        if self._log is None:
            # backslashreplace: a message may name a file whose name is not UTF-8.
            self._log = open(  # noqa: SIM115
                self.path / "train.log", "a", encoding="utf-8", errors="backslashreplace"
            )
        self._log.write(f"{stamp} {message}\n")
        self._log.flush()
        if self.echo and echo:
            print(message, file=sys.stderr, flush=True)

    def write_metrics(self, row: dict[str, Any]) -> None:
        """Append one JSON object to metrics.jsonl (a non-finite value as null)."""
        if self._metrics is None:
            self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._metrics.write(json_text(row, sort_keys=True) + "\n")
        self._metrics.flush()

    def truncate_metrics_after(self, step: int) -> None:
        """Drop rows logged after ``step``: on resume those steps are trained again.

        A crash can also leave a torn last line; it is dropped too.
        """
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None  # reopened on the next row, on the rewritten file
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        atomic_write(
            self.path / "metrics.jsonl", "".join(json_text(r, sort_keys=True) + "\n" for r in kept)
        )

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.path / "metrics.json", json_text(summary, indent=2, sort_keys=True))

    def close(self) -> None:
        for sink in (self._log, self._metrics):
            if sink is not None:
                sink.close()
        self._log = self._metrics = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None


def input_hashes(config: Config) -> dict[str, str]:
    """SHA-256 of every file (not folder) the config names, by key path: the data a run reads
    from outside Kiln (dialogue pairs, an NCA target, CoT records, a hashtron data file)."""
    hashes = {}
    for setting in path_settings(config):
        path = Path(setting.value).expanduser()
        if path.is_file():
            hashes[setting.key] = sha256_file(path)
    return hashes


def _path_of(config: Config, key: str) -> str:
    return next((s.value for s in path_settings(config) if s.key == key), "?")


def write_eval(run_dir: Path, step: int, results: dict[str, Any]) -> Path:
    """Merge ``results`` into ``eval/<step>.json`` (a later suite run adds to earlier ones)."""
    path = Path(run_dir) / "eval" / f"{step:08d}.json"
    path.parent.mkdir(exist_ok=True)
    try:
        merged = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        merged = {}
    merged |= {"step": step, **results}
    atomic_write(path, json_text(merged, indent=2, sort_keys=True))
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl; a torn or malformed line (from a crash) is skipped."""
    rows = []
    try:
        lines = (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_summary(path: Path) -> dict[str, Any]:
    """metrics.json, or {} if the run has not written one yet."""
    try:
        return json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def started_software(path: Path) -> dict[str, Any] | None:
    """The software versions a run started with (software.json); None for runs from before it."""
    try:
        return json.loads((path / SOFTWARE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def list_runs(root: Path) -> list[dict[str, Any]]:
    """One row per run under ``root``: id, job, status, step, last loss, val perplexity and
    (hashtron runs) eval accuracy."""
    rows = []
    if not root.is_dir():
        return rows
    for path in sorted(p for p in root.iterdir() if (p / SNAPSHOT).is_file()):
        try:
            job = yaml.safe_load((path / SNAPSHOT).read_text(encoding="utf-8")).get("job", "?")
        except (OSError, yaml.YAMLError, AttributeError):
            job = "?"
        summary = read_summary(path)
        status = (path / "status").read_text().strip() if (path / "status").exists() else "?"
        # metrics.json is written when a run session ends: a running or killed run, or one
        # killed after a resume, shows its last logged step and evaluation instead.
        logged = read_metrics(path)
        last_step = max((r["step"] for r in logged if "step" in r), default=-1)
        if last_step > summary.get("step", -1):  # hashtron rows have a step and no loss
            summary = {
                "step": last_step,
                "final_loss": _last(logged, "loss"),
                "final_val_ppl": _last(logged, "val_ppl"),
                "eval_accuracy": _last(logged, "eval_accuracy"),
            }
        rows.append(
            {
                "id": path.name,
                "job": job,
                "status": status,
                "step": summary.get("step"),
                "loss": summary.get("final_loss"),
                "val_ppl": summary.get("final_val_ppl"),
                "eval_acc": summary.get("eval_accuracy"),
            }
        )
    return rows


def _last(rows: list[dict[str, Any]], key: str) -> Any:
    """The value of ``key`` in the last row that has it, or None."""
    return next((row[key] for row in reversed(rows) if key in row), None)
