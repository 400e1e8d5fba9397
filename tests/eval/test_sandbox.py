"""The code sandbox: verdicts, limits, clean-up and the protections it reports."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kiln.eval import sandbox
from kiln.eval.code_problems import CodeProblem
from kiln.eval.sandbox import SandboxError, SandboxLimits, check_sandbox, run_candidate

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs a POSIX system")

PROBLEM = CodeProblem(
    id="test/add",
    prompt='def add(a, b):\n    """Return a + b."""\n',
    entry_point="add",
    canonical_solution="    return a + b\n",
    tests="assert add(1, 2) == 3\nassert add(-4, 4) == 0\n",
)
LIMITS = SandboxLimits(timeout_s=5.0, cpu_seconds=2, memory_bytes=256 * 2**20, output_bytes=2**16)
SHORT = SandboxLimits(timeout_s=2.0, cpu_seconds=1, memory_bytes=256 * 2**20, output_bytes=2**16)


SLEEPER = "import time; time.sleep(60)"


def body(*lines: str) -> str:
    return "".join(f"    {line}\n" for line in lines)


def test_reference_solution_passes_and_reports_protections() -> None:
    result = run_candidate(PROBLEM, PROBLEM.canonical_solution, LIMITS)
    assert (result.passed, result.status, result.reason) == (True, "passed", "passed")
    assert result.duration_s > 0
    for protection in ("isolated_python", "empty_environment", "own_session", "temp_workdir"):
        assert protection in result.protections
    for protection in ("cpu_limit", "memory_limit", "file_size_limit", "no_core_dumps"):
        assert protection in result.protections
    assert set(result.protections) <= set(sandbox.PROTECTIONS)  # every name is documented
    assert set(check_sandbox(LIMITS)) <= set(sandbox.PROTECTIONS)


def test_wrong_answer_fails_with_the_failing_assert() -> None:
    result = run_candidate(PROBLEM, body("return a - b"), LIMITS)
    assert (result.passed, result.status) == (False, "failed")
    assert result.reason == "AssertionError: assert add(1, 2) == 3"
    assert "Traceback" in result.output


def test_exception_fails_with_its_type() -> None:
    result = run_candidate(PROBLEM, body("return a / 0"), LIMITS)
    assert result.status == "failed"
    assert result.reason.startswith("ZeroDivisionError")


def test_syntax_error_is_never_started() -> None:
    for completion in (body("return (a +"), "    return a\x00\n"):
        result = run_candidate(PROBLEM, completion, LIMITS)
        assert (result.passed, result.status) == (False, "syntax_error")
        assert result.reason.startswith("does not compile")
        assert result.protections == ()


def test_a_syntax_error_reason_names_a_line_only_when_there_is_one() -> None:
    assert run_candidate(PROBLEM, body("return (a +"), LIMITS).reason.endswith("(line 3)")
    reason = run_candidate(PROBLEM, "    return a\x00\n", LIMITS).reason
    assert reason.startswith("does not compile") and "None" not in reason


def test_exiting_early_with_status_zero_does_not_pass() -> None:
    for completion in (
        body("import os", "os._exit(0)"),
        body("raise SystemExit(0)"),
        # Printing something that looks like the marker does not help: it is random per run.
        body("print('kiln-tests-finished-0123456789abcdef0123456789abcdef')", "raise SystemExit"),
    ):
        result = run_candidate(PROBLEM, completion, LIMITS)
        assert (result.passed, result.status) == (False, "failed")
        assert result.reason == "exited with status 0 before the tests finished"


def test_output_without_a_final_newline_does_not_fail_a_correct_candidate() -> None:
    for completion in (
        body("print('partial', end='')", "return a + b"),
        body("import sys", "sys.stdout.write('no newline')", "return a + b"),
    ):
        result = run_candidate(PROBLEM, completion, LIMITS)
        assert (result.passed, result.status) == (True, "passed"), result.reason


def test_infinite_loop_is_stopped() -> None:
    result = run_candidate(PROBLEM, body("while True:", "    pass"), SHORT)
    assert not result.passed
    assert result.status in ("cpu_limit", "timeout")


def test_sleeping_forever_times_out() -> None:
    result = run_candidate(PROBLEM, body("import time", "time.sleep(1000)"), SHORT)
    assert (result.passed, result.status) == (False, "timeout")
    assert result.reason == "timed out after 2 s of wall time"


@pytest.mark.parametrize(
    "completion",
    [
        body("return bytearray(2**40)"),
        body("hoard = []", "while True:", "    hoard.append(' ' * 2**20)"),
    ],
)
def test_memory_bomb_hits_the_memory_limit(completion: str) -> None:
    # Time limits far off: on a loaded machine the bomb must still end on memory, not on time.
    result = run_candidate(PROBLEM, completion, replace(SHORT, timeout_s=60.0, cpu_seconds=30))
    assert (result.passed, result.status) == (False, "memory_limit")


@pytest.mark.parametrize(
    "completion",
    [
        body("while True:", "    print('spam' * 1000)"),
        body("import sys", "sys.stdout.write('x' * 50_000_000)", "return a + b"),
        body("import os", "while True:", "    os.write(2, b'e' * 65536)"),
    ],
)
def test_output_flood_is_cut_off(completion: str) -> None:
    result = run_candidate(PROBLEM, completion, SHORT)
    assert (result.passed, result.status) == (False, "output_limit")
    assert result.reason == f"printed more than {SHORT.output_bytes} bytes"
    assert len(result.output) <= 2000


def test_large_file_is_refused() -> None:
    limits = SandboxLimits(timeout_s=5.0, cpu_seconds=2, file_size_bytes=2**20)
    completion = body(
        "with open('big.bin', 'wb') as f:", "    f.write(b'x' * 2**21)", "return a + b"
    )
    result = run_candidate(PROBLEM, completion, limits)
    assert not result.passed
    # Python ignores SIGXFSZ, so the write fails with EFBIG; a read-only mount gives EROFS.
    assert "File too large" in result.reason or "Read-only" in result.reason


def test_environment_is_empty_and_workdir_is_private_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILN_TEST_SECRET", "do-not-leak")
    completion = body(
        "import os, sys",
        "assert 'KILN_TEST_SECRET' not in os.environ, os.environ",
        "assert 'HOME' not in os.environ",
        "assert sys.flags.isolated == 1",
        "if not os.path.exists('locked'):  # the tests call add() twice",
        "    assert os.listdir('.') == ['candidate.py'], os.listdir('.')",
        "    os.makedirs('locked/inner')",
        "    open('locked/inner/f.txt', 'w').write('x')",
        "    os.chmod('locked/inner', 0)",
        "    os.chmod('locked', 0)",
        "print('WORKDIR', os.path.basename(os.getcwd()))",
        "return a + b",
    )
    result = run_candidate(PROBLEM, completion, LIMITS)
    assert result.passed, result.output
    name = next(
        line.split()[1] for line in result.output.splitlines() if line.startswith("WORKDIR")
    )
    assert name.startswith("kiln-sandbox-")
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), name))


def test_network_is_unreachable_where_namespaces_exist() -> None:
    if "network_namespace" not in check_sandbox(LIMITS):
        pytest.skip("no network namespace on this machine")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        completion = body(
            "import socket",
            "try:",
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()",
            "    reached = True",
            "except OSError:",
            "    reached = False",
            "assert not reached, 'reached the host network'",
            "return a + b",
        )
        result = run_candidate(PROBLEM, completion, LIMITS)
    assert result.passed, result.reason


def test_filesystem_outside_the_workdir_is_read_only_where_namespaces_exist(
    tmp_path: Path,
) -> None:
    if "read_only_filesystem" not in check_sandbox(LIMITS):
        pytest.skip("no mount namespace on this machine")
    target = tmp_path / "escaped.txt"
    completion = body(
        "try:",
        f"    open({str(target)!r}, 'w').write('x')",
        "except OSError as error:",
        "    print('refused', error.errno)",
        "open('inside.txt', 'w').write('fine')",
        "return a + b",
    )
    result = run_candidate(PROBLEM, completion, LIMITS)
    assert result.passed, result.output
    assert "refused" in result.output
    assert not target.exists()


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _wait_until_gone(marker: str) -> list[int]:
    deadline = time.monotonic() + 5
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _processes_with(marker)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_detached_processes_do_not_outlive_the_candidate() -> None:
    protections = check_sandbox(LIMITS)
    if "pid_namespace" not in protections and "no_new_processes" not in protections:
        pytest.skip("neither a PID namespace nor a process limit is available here")
    marker = f"kiln-stray-{os.getpid()}-{time.monotonic_ns()}"
    completion = body(
        "import os, sys",
        "try:",
        "    if os.fork() == 0:",
        "        os.setsid()",
        f"        os.execv(sys.executable, [sys.executable, '-c', {SLEEPER!r}, {marker!r}])",
        "except OSError as error:",
        "    print('fork refused', error)",
        "return a + b",
    )
    result = run_candidate(PROBLEM, completion, LIMITS)
    assert result.passed, result.output
    assert _wait_until_gone(marker) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_without_namespaces_a_timeout_kills_the_process_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", False)
    protections = check_sandbox(SHORT)
    assert "network_namespace" not in protections
    assert "pid_namespace" not in protections
    marker = f"kiln-group-{os.getpid()}-{time.monotonic_ns()}"
    completion = body(
        "import os, sys, time",
        "try:",
        "    if os.fork() == 0:",
        f"        os.execv(sys.executable, [sys.executable, '-c', {SLEEPER!r}, {marker!r}])",
        "except OSError as error:",
        "    print('fork refused', error)",
        "time.sleep(60)",
    )
    result = run_candidate(PROBLEM, completion, SHORT)
    assert result.status == "timeout"
    assert _wait_until_gone(marker) == []


def test_network_isolation_can_be_required(monkeypatch: pytest.MonkeyPatch) -> None:
    required = SandboxLimits(timeout_s=5.0, require_network_isolation=True)
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", False)
    with pytest.raises(SandboxError, match="network"):
        check_sandbox(required)
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", True)
    if "network_namespace" in check_sandbox(LIMITS):
        assert "network_namespace" in check_sandbox(required)


def test_a_sandbox_that_cannot_start_raises() -> None:
    with pytest.raises(SandboxError, match="empty program"):
        check_sandbox(SandboxLimits(timeout_s=4.5, memory_bytes=2**20))


def test_a_missing_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(SandboxError):
        run_candidate(PROBLEM, PROBLEM.canonical_solution, SandboxLimits(timeout_s=4.25))


@pytest.mark.parametrize(
    "field", ["timeout_s", "cpu_seconds", "memory_bytes", "output_bytes", "file_size_bytes"]
)
@pytest.mark.parametrize("value", [0, -1, True, "5"])
def test_limits_must_be_positive_numbers(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SandboxLimits(**{field: value})  # type: ignore[arg-type]
