"""`kiln train|resume --nproc N`: start N local processes through torchrun.

The command runs torchrun's agent in its own process, as ``torchrun --standalone
--nproc-per-node N -m kiln <the same arguments without --nproc>`` would, so the agent owns the
workers directly (signals and failures reach it, no extra parent in between), and then turns
the agent's ways of ending into Kiln's exit codes. Inside, each worker is a normal ``kiln``
process that finds its rank in the environment.
"""

from __future__ import annotations

import os
import signal
import sys

from kiln.config import Config, resolve_config
from kiln.errors import ConfigError, KilnError

NPROC = "--nproc"


INTERRUPTED = 130  # the exit code of a run stopped by a signal (it checkpointed)
USER_ERROR = 2  # the exit code of a KilnError; the worker printed its message
# A worker that torchrun terminated because another one had ended (see run_torchrun).
TERMINATED = -signal.SIGTERM


def torchrun_args(nproc: int, kiln_args: list[str]) -> list[str]:
    """torchrun's arguments for ``nproc`` workers running ``kiln <kiln_args>``."""
    check_nproc(nproc)
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "kiln", *without_nproc(kiln_args)]


def without_nproc(args: list[str]) -> list[str]:
    """``args`` without ``--nproc N`` / ``--nproc=N``."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == NPROC:
            skip = True
        elif not arg.startswith(f"{NPROC}="):
            kept.append(arg)
    return kept


def check_nproc(nproc: int) -> None:
    """Raise ``KilnError`` unless ``nproc`` is a number of processes."""
    if nproc < 1:
        raise KilnError(f"--nproc must be >= 1, got {nproc}")


def check_launch(config: Config, nproc: int) -> None:
    """What every worker would refuse, refused once before torchrun starts them: a process
    count below 1, a one-process strategy, a backend this device lacks, a world size that does
    not split the global batch."""
    check_nproc(nproc)  # first: strategy.world_size below cannot hold a count below 1
    from kiln.engine.distributed import (  # torch: imported only when launching
        DISTRIBUTED,
        backend_for,
        check_world,
        resolve_world,
    )

    if nproc > 1 and config.strategy.name not in DISTRIBUTED:
        raise ConfigError(
            f"--nproc {nproc} needs strategy.name ddp or fsdp (this config has "
            f"{config.strategy.name!r}); add --set strategy.name=ddp"
        )
    resolved = resolve_config(config)
    if resolved.strategy.name in DISTRIBUTED:
        backend_for(resolved)
    check_world(resolve_world(resolved, nproc), nproc)


def under_torchrun() -> bool:
    """Whether this process is already a torchrun worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def run_torchrun(nproc: int, kiln_args: list[str]) -> int:
    """Run torchrun's agent with ``nproc`` kiln workers in this process; the exit code.

    A stop signal to the agent, or workers that all stopped on one, give 130 (the run
    checkpointed); workers that ended on a user error (their message printed) give 2; anything
    else (a crash, a killed worker) gives 1, naming each failed rank's exit code. torchrun's own
    report of these, a traceback, is not shown. torchrun sends SIGTERM to the other workers as
    soon as one ends with a non-zero code; a worker still shutting down its interpreter then
    (Python has given up its handlers) dies of it, which says nothing about how it ended.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args(nproc, kiln_args)))
    except SignalException:
        return INTERRUPTED
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        codes = codes - {TERMINATED} or codes  # only terminated ones: still a failure
        if codes <= {INTERRUPTED}:
            return INTERRUPTED
        if codes <= {USER_ERROR, INTERRUPTED}:
            return USER_ERROR
        ranks = ", ".join(
            f"rank {rank}: exit code {failure.exitcode}"
            for rank, failure in sorted(exc.failures.items())
        )
        print(f"error: workers failed ({ranks}); their messages are above", file=sys.stderr)
        return 1
    return 0
