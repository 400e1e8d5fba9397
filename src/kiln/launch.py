"""`kiln train|resume --nproc N`: start N local processes through torchrun.

The command replaces the current process with ``python -m torch.distributed.run --standalone
--nproc-per-node N -m kiln <the same arguments without --nproc>``, so torchrun's agent owns the
workers directly (signals and failures reach it, no extra parent in between). Inside, each
worker is a normal ``kiln`` process that finds its rank in the environment.
"""

from __future__ import annotations

import os
import sys

from kiln.config import Config, resolve_config
from kiln.errors import ConfigError, KilnError

NPROC = "--nproc"


def torchrun_command(nproc: int, kiln_args: list[str]) -> list[str]:
    """The torchrun command line for ``nproc`` workers running ``kiln <kiln_args>``."""
    if nproc < 1:
        raise KilnError(f"--nproc must be >= 1, got {nproc}")
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "kiln", *without_nproc(kiln_args),
    ]


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


def check_launch(config: Config, nproc: int) -> None:
    """What every worker would refuse, refused once before torchrun starts them: a one-process
    strategy, a backend this device lacks, a world size that does not split the global batch."""
    if nproc > 1 and config.strategy.name not in ("ddp", "fsdp"):
        raise ConfigError(
            f"--nproc {nproc} needs strategy.name ddp or fsdp (this config has "
            f"{config.strategy.name!r}); add --set strategy.name=ddp"
        )
    from kiln.engine.distributed import backend_for, check_world, resolve_world  # torch: lazily

    resolved = resolve_config(config)
    if resolved.strategy.name in ("ddp", "fsdp"):
        backend_for(resolved)
    check_world(resolve_world(resolved, nproc), nproc)


def under_torchrun() -> bool:
    """Whether this process is already a torchrun worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def exec_torchrun(nproc: int, kiln_args: list[str]) -> None:
    """Replace this process with torchrun running ``nproc`` kiln workers (never returns)."""
    command = torchrun_command(nproc, kiln_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
