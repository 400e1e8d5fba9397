"""Run one model-written completion against its tests in a short-lived, limited child process.

This contains accidents (an endless loop, a memory bomb, a flood of output, a stray `rm -rf`
when namespaces are available); it is not a security boundary against code written to escape.
The child shares the host's kernel and, unless root could be dropped, its user; there is no
seccomp filter. See the README section "pass@k and the code-execution sandbox".

How one candidate runs:

1. The parent writes ``prompt + completion + tests`` and a final line that prints a random marker
   (on a line of its own) to ``candidate.py`` in a fresh temporary folder (deleted afterwards).
2. It starts ``python -I -S -c <bootstrap>`` in that folder with an empty environment, in a new
   session (so one kill reaches the whole process group), stdout and stderr on one pipe, and a
   second pipe on which the bootstrap reports what it set up and how the candidate ended.
3. The bootstrap (Linux) moves into new network, PID and mount namespaces where the kernel lets
   it (directly, or inside a new user namespace when unprivileged), makes every mount read-only
   except the temporary folder, drops root to ``nobody`` where the interpreter is reachable by
   that user, and sets resource limits (CPU, address space, file size, no core files; no new
   processes when not root). It then forks the candidate: ``python -I -S candidate.py``, which
   sees only the standard library, so results do not depend on what else is installed.
4. The parent reads the output up to a cap, kills the process group on timeout or flood, and
   calls it a pass only if the candidate exited with 0 *and* printed the marker, so code that
   exits early with status 0 does not pass.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.eval.code_problems import CodeProblem
from kiln.eval.compile_check import compiles

PROGRAM_NAME = "candidate.py"
# Tests switch this off to exercise the fallback that systems without namespaces get.
_USE_NAMESPACES = True
_OUTPUT_KEPT_CHARS = 2000  # tail of the output kept on a result, for debugging

# Outcomes a candidate can have; `passed` is the only success.
STATUSES = (
    "passed",
    "failed",  # nonzero exit (an assertion or another exception), or exit 0 before the tests ended
    "syntax_error",  # the program does not compile; it was never started
    "timeout",  # wall-clock limit reached; the process group was killed
    "cpu_limit",  # RLIMIT_CPU reached
    "memory_limit",  # ended by a MemoryError: RLIMIT_AS refused an allocation (or the program
    # raised MemoryError itself, which the sandbox cannot tell apart without inspecting bytecode)
    "output_limit",  # printed more than the output cap; the process group was killed
    "killed",  # ended by another signal (segfault, file size limit, ...)
)

# The names `check_sandbox()` and `ExecutionResult.protections` report, and what each means.
PROTECTIONS = {
    "isolated_python": "python -I -S: no PYTHON* variables, no user or site packages, no cwd path",
    "empty_environment": "no environment variables are passed to the candidate",
    "own_session": "a new session and process group, killed as a whole at the end",
    "temp_workdir": "runs in a fresh temporary folder that is deleted afterwards",
    "user_namespace": "an unprivileged user namespace was needed for the others",
    "network_namespace": "a new, empty network namespace: no network at all, not even loopback",
    "pid_namespace": "a new PID namespace: every process it starts dies with it",
    "read_only_filesystem": "every mount is read-only except the temporary folder",
    "unprivileged_user": "root was dropped to the user nobody",
    "no_core_dumps": "RLIMIT_CORE = 0",
    "cpu_limit": "RLIMIT_CPU",
    "memory_limit": "RLIMIT_AS",
    "file_size_limit": "RLIMIT_FSIZE",
    "no_new_processes": "RLIMIT_NPROC = 0: no fork, no threads (not enforceable for root)",
}


@dataclass(frozen=True)
class SandboxLimits:
    """Per-candidate limits; fill from the config (``eval.*``) or use the defaults."""

    timeout_s: float = 5.0  # wall clock for one candidate, start-up included
    cpu_seconds: float = 3.0  # RLIMIT_CPU of the candidate process (rounded up to whole seconds)
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS: address space, not resident memory
    output_bytes: int = 2**20  # stdout + stderr kept before the candidate is killed
    file_size_bytes: int = 16 * 2**20  # RLIMIT_FSIZE: largest file the candidate may write
    require_network_isolation: bool = False  # refuse to run where no network namespace is possible

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_seconds", "memory_bytes", "output_bytes", "file_size_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ExecutionResult:
    """How one candidate fared. ``reason`` is one human-readable line."""

    passed: bool
    status: str
    reason: str
    duration_s: float
    protections: tuple[str, ...] = ()
    output: str = ""  # the last characters of stdout + stderr


class SandboxError(KilnError):
    """The sandbox itself could not run (not the candidate's fault)."""


def run_candidate(
    problem: CodeProblem, completion: str, limits: SandboxLimits | None = None
) -> ExecutionResult:
    """Run ``problem.prompt + completion`` against ``problem.tests`` in the sandbox.

    This EXECUTES the completion. Call it only when the user has opted in to running generated
    code. Raises SandboxError when the sandbox cannot start at all.
    """
    limits = limits or SandboxLimits()
    drop_to, _ = _sandbox_setup(limits)
    return _run(_assemble(problem, completion), limits, drop_to)


def check_sandbox(limits: SandboxLimits | None = None) -> tuple[str, ...]:
    """Run an empty program in the sandbox and return the protections that were active.

    Raises SandboxError when even an empty program cannot run under ``limits``, or when
    ``limits.require_network_isolation`` is set and no network namespace can be made. The result
    is cached per ``limits``; log it once so a run records how its candidates were contained.
    """
    return _sandbox_setup(limits or SandboxLimits())[1]


def _assemble(problem: CodeProblem, completion: str) -> tuple[str, str]:
    """The program text and the marker its last line prints."""
    marker = f"kiln-tests-finished-{secrets.token_hex(16)}"
    body = completion if completion.endswith("\n") else completion + "\n"
    tests = problem.tests if problem.tests.endswith("\n") else problem.tests + "\n"
    # The newline puts the marker on a line of its own after output that does not end in one.
    source = f"{problem.prompt}{body}\n\n{tests}\nprint('\\n' + {marker!r}, flush=True)\n"
    return source, marker


def _sandbox_setup(limits: SandboxLimits) -> tuple[int | None, tuple[str, ...]]:
    """Whether to drop root to `nobody`, and the protections active; probed once per limits."""
    return _probe(limits, _USE_NAMESPACES)


@functools.lru_cache(maxsize=16)
def _probe(limits: SandboxLimits, use_namespaces: bool) -> tuple[int | None, tuple[str, ...]]:
    if os.name != "posix":
        raise SandboxError(
            "running generated code needs a POSIX system (Linux or macOS) for process limits; "
            "turn off code execution (eval.allow_code_execution: false) on this platform"
        )
    attempts: list[int | None] = [None]
    if os.geteuid() == 0:
        # Try `nobody` first; it fails where the interpreter sits in a folder only root can read
        # (a venv under /root, for example), and then the candidate runs as root.
        attempts.insert(0, _nobody_uid())
    problems = []
    for drop_to in attempts:
        try:
            probe = _run(("pass\n", ""), limits, drop_to, marker_required=False)
        except SandboxError as exc:
            problems.append(f"as {_who(drop_to)}: {exc}")
            continue
        if probe.passed:
            if limits.require_network_isolation and "network_namespace" not in probe.protections:
                raise SandboxError(
                    "the sandbox cannot isolate generated code from the network here (no network "
                    "namespace: unprivileged user namespaces are off, or a seccomp filter forbids "
                    "unshare); allow them or set require_network_isolation to false"
                )
            return drop_to, probe.protections
        problems.append(f"as {_who(drop_to)}: {probe.reason}")
    raise SandboxError(
        f"the code sandbox cannot run an empty program ({'; '.join(problems)}); "
        f"if it ran out of memory, raise the memory limit (now {limits.memory_bytes} bytes)"
    )


def _nobody_uid() -> int:
    import pwd  # POSIX only; imported here so this module still imports elsewhere

    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def _who(drop_to: int | None) -> str:
    return f"uid {drop_to if drop_to is not None else os.geteuid()}"


def _run(
    program: tuple[str, str],
    limits: SandboxLimits,
    drop_to: int | None,
    marker_required: bool = True,
) -> ExecutionResult:
    source, marker = program
    start = time.monotonic()
    if not compiles(source):
        return _result(False, "syntax_error", _syntax_reason(source), start)
    workdir = tempfile.mkdtemp(prefix="kiln-sandbox-")
    try:
        path = os.path.join(workdir, PROGRAM_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(source)
        if drop_to is not None:
            os.chown(workdir, drop_to, drop_to)
            os.chown(path, drop_to, drop_to)
        outcome, events, raw = _spawn_and_collect(workdir, limits, drop_to, start)
    finally:
        _remove_tree(workdir)
    output = raw.decode("utf-8", errors="replace").replace(workdir, "<sandbox>")
    return _classify(outcome, events, output, marker if marker_required else None, limits, start)


def _spawn_and_collect(
    workdir: str, limits: SandboxLimits, drop_to: int | None, start: float
) -> tuple[str, dict[str, dict], bytes]:
    """Start the bootstrap and read its output and reports until it ends, floods or times out."""
    status_read, status_write = os.pipe()
    config = {
        "status_fd": status_write,
        "python": sys.executable,
        "program": PROGRAM_NAME,
        "drop_to": drop_to,
        "cpu_seconds": math.ceil(limits.cpu_seconds),
        "memory_bytes": int(limits.memory_bytes),
        "file_size_bytes": int(limits.file_size_bytes),
        "namespaces": _USE_NAMESPACES,
    }
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(config)],
            cwd=workdir,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(status_write,),
            start_new_session=True,
        )
    except OSError as exc:
        os.close(status_read)
        raise SandboxError(f"cannot start the code sandbox ({sys.executable}): {exc}") from exc
    finally:
        os.close(status_write)
    assert process.stdout is not None
    output, reports = bytearray(), bytearray()
    outcome = "ended"
    selector = selectors.DefaultSelector()
    selector.register(process.stdout.fileno(), selectors.EVENT_READ, "output")
    selector.register(status_read, selectors.EVENT_READ, "status")
    deadline = start + limits.timeout_s
    try:
        while selector.get_map():
            # Once the supervisor has closed the report pipe the candidate is gone; only drain
            # what is already buffered, since a stray grandchild could hold stdout open forever.
            finished = not any(key.data == "status" for key in selector.get_map().values())
            wait = 0.0 if finished else deadline - time.monotonic()
            if wait < 0:
                outcome = "timeout"
                break
            events = selector.select(wait)
            if not events:
                if finished:
                    break
                continue
            for key, _ in events:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                elif key.data == "status":
                    reports += chunk
                else:
                    output += chunk
            if len(output) > limits.output_bytes:
                outcome = "output_limit"
                break
    finally:
        selector.close()
        # Kill the whole group before reaping the leader, so its id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
        os.close(status_read)
    events_by_name: dict[str, dict] = {}
    for line in reports.decode("utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events_by_name.setdefault(str(event.get("event")), event)
    return outcome, events_by_name, bytes(output[: limits.output_bytes])


def _classify(
    outcome: str,
    events: dict[str, dict],
    output: str,
    marker: str | None,
    limits: SandboxLimits,
    start: float,
) -> ExecutionResult:
    if "exec_error" in events:
        raise SandboxError(
            f"the code sandbox could not start the candidate interpreter: "
            f"{events['exec_error'].get('error')}"
        )
    if "ready" not in events and outcome == "ended":
        raise SandboxError(
            "the code sandbox failed before running the candidate: "
            f"{_last_line(output) or 'no message'}"
        )
    protections = tuple(events.get("ready", {}).get("protections", ())) + tuple(
        events.get("exec", {}).get("protections", ())
    )

    def done(passed: bool, status: str, reason: str) -> ExecutionResult:
        return _result(passed, status, reason, start, protections, output[-_OUTPUT_KEPT_CHARS:])

    if outcome == "timeout":
        return done(False, "timeout", f"timed out after {limits.timeout_s:g} s of wall time")
    if outcome == "output_limit":
        return done(False, "output_limit", f"printed more than {limits.output_bytes} bytes")
    if "exit" not in events:
        return done(False, "killed", "the candidate's supervisor was killed before it reported")
    code = int(events["exit"].get("code", -1))
    cpu = float(events["exit"].get("cpu_s", 0.0))
    if code == 0:
        if marker is None or marker in output.splitlines():
            return done(True, "passed", "passed")
        return done(False, "failed", "exited with status 0 before the tests finished")
    if code < 0:
        number = -code
        name = _signal_name(number)
        if number == signal.SIGXCPU or (
            number == signal.SIGKILL and cpu >= math.ceil(limits.cpu_seconds) - 0.05
        ):
            return done(False, "cpu_limit", f"used its {math.ceil(limits.cpu_seconds)} s of CPU")
        if number == getattr(signal, "SIGXFSZ", None):
            return done(False, "killed", f"wrote a file larger than {limits.file_size_bytes} bytes")
        return done(False, "killed", f"killed by {name}")
    last = _last_line(output)
    if last.startswith("MemoryError"):
        return done(False, "memory_limit", f"ran out of its {limits.memory_bytes} bytes of memory")
    return done(False, "failed", _failure_reason(output) or f"exited with status {code}")


def _result(
    passed: bool,
    status: str,
    reason: str,
    start: float,
    protections: tuple[str, ...] = (),
    output: str = "",
) -> ExecutionResult:
    duration = time.monotonic() - start
    return ExecutionResult(passed, status, reason, round(duration, 4), protections, output)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _failure_reason(output: str) -> str:
    """The exception line of a traceback; for a bare AssertionError, also the failing assert."""
    last = _last_line(output)
    if last == "AssertionError":
        for line in reversed(output.splitlines()):
            if line.strip().startswith("assert "):
                last = f"AssertionError: {line.strip()}"
                break
    return last[:300]


def _syntax_reason(source: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(source, PROGRAM_NAME, "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""  # a NUL byte error has no line
        return f"does not compile: {exc.msg}{where}"
    except Exception as exc:  # the other rejections of compile_check.compiles
        return f"does not compile: {type(exc).__name__}"
    return "does not compile"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _remove_tree(path: str) -> None:
    """Delete the working folder even if the candidate took away its own permissions."""
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            # Never chmod through a symlink: it could point anywhere on the system.
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)


# Runs first in the child, as `python -I -S -c`, with the JSON config as argv[1]. It must only use
# the standard library and must never touch the host's mounts unless a new mount namespace exists.
_BOOTSTRAP = r"""
import json, os, re, resource, sys

cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
active = ["isolated_python", "empty_environment", "own_session", "temp_workdir"]


def report(event, **fields):
    fields["event"] = event
    os.write(status_fd, (json.dumps(fields) + "\n").encode())


def limit(name, value, label, grace=0):
    kind = getattr(resource, name, None)
    if kind is None:
        return
    try:
        _, hard = resource.getrlimit(kind)
        cap = (lambda v: v if hard == resource.RLIM_INFINITY else min(v, hard))
        resource.setrlimit(kind, (cap(value), cap(value + grace)))
    except (OSError, ValueError):
        return
    if label:
        active.append(label)


def read_only_mounts(libc):
    # Called only inside a fresh mount namespace: first stop propagation to the host, then keep
    # the working folder writable as its own bind mount, then remount everything else read-only.
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
    kept = {b"nosuid": 2, b"nodev": 4, b"noexec": 8, b"noatime": 1024, b"nodiratime": 2048,
            b"relatime": 1 << 21}
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    work = os.fsencode(os.getcwd())
    if libc.mount(work, work, None, MS_BIND | MS_REC, None) != 0:
        return False
    os.chdir(work)  # re-enter the folder through the new mount; the old cwd would stay read-only
    with open("/proc/self/mountinfo", "rb") as handle:
        entries = handle.read().splitlines()
    every = True
    for entry in entries:
        fields = entry.split()
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
        if point == work:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(b","):
            flags |= kept.get(option, 0)
        if libc.mount(None, point, None, flags, None) != 0:
            every = False
    return every


def enter_namespaces():
    # Returns whether a new PID namespace was made (the next child becomes its init).
    if not cfg["namespaces"] or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare.argtypes = [ctypes.c_int]
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                               ctypes.c_ulong, ctypes.c_void_p]
        mount_ns_before = os.readlink("/proc/self/ns/mnt")
    except (OSError, AttributeError):
        return False
    NEWNS, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
    uid, gid = os.getuid(), os.getgid()
    for flags in (NEWNET | NEWPID | NEWNS, NEWUSER | NEWNET | NEWPID | NEWNS,
                  NEWNET | NEWPID, NEWUSER | NEWNET | NEWPID, NEWNET, NEWUSER | NEWNET):
        if libc.unshare(flags) != 0:
            continue
        if flags & NEWUSER:
            # Map our own ids so files keep their owner inside the namespace.
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):
                try:
                    with open(f"/proc/self/{name}", "w") as handle:
                        handle.write(text)
                except OSError:
                    pass
            active.append("user_namespace")
        active.append("network_namespace")
        if flags & NEWPID:
            active.append("pid_namespace")
        if flags & NEWNS and os.readlink("/proc/self/ns/mnt") != mount_ns_before:
            if read_only_mounts(libc):
                active.append("read_only_filesystem")
        return bool(flags & NEWPID)
    return False


def launch():
    # The candidate process: no new processes (when not root: root ignores RLIMIT_NPROC), then exec.
    try:
        extra = []
        if os.geteuid() != 0:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
            extra.append("no_new_processes")
        report("exec", protections=extra)
        os.set_inheritable(status_fd, False)
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", cfg["program"]], {})
    except BaseException as exc:
        try:
            report("exec_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            os._exit(127)


def supervise():
    child = os.fork()
    if child == 0:
        launch()
    _, status, usage = os.wait4(child, 0)
    report("exit", code=os.waitstatus_to_exitcode(status),
           cpu_s=usage.ru_utime + usage.ru_stime)


new_pid_namespace = enter_namespaces()
if cfg["drop_to"] is not None and os.geteuid() == 0:
    os.setgroups([])
    os.setgid(cfg["drop_to"])  # the same number as a group: nogroup/nobody on common systems
    os.setuid(cfg["drop_to"])
    active.append("unprivileged_user")
limit("RLIMIT_CORE", 0, "no_core_dumps")
limit("RLIMIT_CPU", cfg["cpu_seconds"], "cpu_limit", grace=1)
limit("RLIMIT_AS", cfg["memory_bytes"], "memory_limit")
limit("RLIMIT_FSIZE", cfg["file_size_bytes"], "file_size_limit")
report("ready", protections=active)
if new_pid_namespace:
    # Our next child is the namespace's init; when it exits, the kernel kills every process
    # left in the namespace, including any that escaped the process group.
    init = os.fork()
    if init == 0:
        supervise()
        os._exit(0)
    os.waitpid(init, 0)
else:
    supervise()
"""
