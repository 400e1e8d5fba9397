"""The `kiln` command: argument checks, error reporting and process-wide setup."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kiln import cli, workflows
from kiln.run import SNAPSHOT

SRC = Path(__file__).parents[1] / "src"


def test_a_native_crash_after_a_command_prints_the_python_stack() -> None:
    # os.abort() stands in for a C++ library calling std::terminate: both raise SIGABRT.
    code = "import os\nfrom kiln.cli import main\nmain(['configs'])\nos.abort()\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(SRC), "PYTHONFAULTHANDLER": ""},
    )
    assert done.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in done.stderr
    assert 'File "<string>", line 4' in done.stderr


def _kiln(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run `kiln ARGV` in a fresh interpreter whose stdout is a pipe the reader already closed."""
    code = "import sys\nfrom kiln.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-c", code, *argv], stdout=write_end, stderr=subprocess.PIPE,
            text=True, check=False, env={**os.environ, "PYTHONPATH": str(SRC)},
        )
    finally:
        os.close(write_end)


@pytest.fixture
def generate_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Stand in for the model: record what `kiln generate` asks of the workflow."""
    calls: list[dict] = []

    def fake_generate(run_dir: Path, prompt: str | None, **kwargs: object) -> str:
        calls.append({"prompt": prompt, **kwargs})
        return "generated"

    monkeypatch.setattr(workflows, "generate", fake_generate)
    return calls


@pytest.mark.parametrize(
    "option",
    [
        ["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "-1"],
        ["--temperature=-inf"], ["--max-new-tokens", "-5"], ["--max-new-tokens", "0"],
    ],
)
def test_generate_rejects_bad_sampling_arguments_when_parsing(
    option: list[str], generate_calls: list[dict], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", str(tmp_path), "--prompt", "def f(", *option])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option[0].split('=')[0]}: must be" in err
    assert generate_calls == []


def test_generate_accepts_greedy_decoding_and_an_empty_prompt(
    generate_calls: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", str(tmp_path), "--prompt", "", "--temperature", "0",
            "--max-new-tokens", "1"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "generated\n"
    (call,) = generate_calls
    assert (call["prompt"], call["temperature"], call["max_new_tokens"]) == ("", 0.0, 1)


def test_runs_of_a_missing_folder_or_a_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a folder")
    for root in (tmp_path / "missing", tmp_path / "file"):
        assert cli.main(["runs", str(root)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"error: {root} ")
        assert captured.err.count("\n") == 1


def test_runs_of_a_run_folder_points_to_its_parent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "experiments" / "lm-1"
    run.mkdir(parents=True)
    (run / SNAPSHOT).write_text("job: lm\n")
    assert cli.main(["runs", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run} is itself a run" in err
    assert f"kiln runs {run.parent}" in err


def test_verify_takes_no_run_or_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "--verify", str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    assert "takes no RUN_DIR and no --to" in capsys.readouterr().err


def test_runs_before_any_run_in_the_default_folder_finds_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["runs"]) == 0
    assert capsys.readouterr().out == "no runs found\n"


@pytest.mark.parametrize("command", ["configs", "runs"])
def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(
    command: str, tmp_path: Path
) -> None:
    argv = [command]
    if command == "runs":  # more rows than stdout buffers, so a print itself hits the pipe
        for i in range(300):
            (tmp_path / f"lm-{i:04d}").mkdir()
            (tmp_path / f"lm-{i:04d}" / SNAPSHOT).write_text("job: lm\n")
        argv.append(str(tmp_path))
    done = _kiln(*argv)
    assert done.stderr == ""
    assert done.returncode == 128 + signal.SIGPIPE


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/store/chunk_0003.bin"),
         "No space left on device: /data/store/chunk_0003.bin (free disk space"),
        (OSError(errno.EACCES, "Permission denied", "/data/a.tmp", None, "/data/a"),
         "Permission denied: /data/a.tmp -> /data/a (fix the permissions"),
        (OSError(errno.ENOTDIR, "Not a directory", "/data/cache/x"),
         "Not a directory: /data/cache/x (check the path in the config"),
    ],
    ids=["disk-full", "permission", "path"],
)
def test_an_os_error_prints_one_line_with_a_hint_and_exits_2(
    error: OSError, shown: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def failing_command(args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_run", failing_command)
    assert cli.main(["configs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shown}")
    assert err.count("\n") == 1
    with pytest.raises(OSError) as raised:  # --debug keeps the traceback
        cli.main(["--debug", "configs"])
    assert raised.value is error


def test_an_os_error_that_means_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing_command(args: object) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cli, "_run", failing_command)
    with pytest.raises(OSError, match="Bad file descriptor"):
        cli.main(["configs"])


SIGTERM_DURING_DATA_PREPARATION = """
import os, signal, sys, time
from kiln.cli import main
from kiln.jobs import lm

def prepare_data(config, log):  # the corpus scan and tokenization, when the signal comes
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

lm.prepare_data = prepare_data
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_before_the_first_step_marks_the_run_interrupted(tmp_path: Path) -> None:
    """The training loop's own handler is not installed yet; SIGTERM stops as Ctrl-C does."""
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_DURING_DATA_PREPARATION, "train", "--config", "smoke",
         "--set", f"run.root={tmp_path}", "--set", "hardware.device=cpu"],
        capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert done.returncode == 130, done.stderr
    (run,) = tmp_path.iterdir()
    assert (run / "status").read_text().strip() == "interrupted"
    assert f"continue with: kiln resume {run}" in (run / "train.log").read_text()


@pytest.mark.parametrize(("world_size", "hint"), [(None, ""), ("1", ""), ("2", " --nproc 2")])
def test_an_interrupted_run_is_continued_with_as_many_processes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    world_size: str | None, hint: str,
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:  # as torchrun sets it in each worker of `--nproc N`
        monkeypatch.setenv("WORLD_SIZE", world_size)
    outcome = workflows.TrainOutcome(tmp_path, "interrupted", 7, None, None, None, {})
    assert cli._report(outcome) == 130
    assert f"continue with: kiln resume {tmp_path}{hint}\n" in capsys.readouterr().out
