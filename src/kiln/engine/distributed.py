"""Data-parallel placements on torch.distributed, and the process group they run in.

``DataParallel`` wraps the model in DDP; ``FullyShardedDataParallel`` applies FSDP2's
``fully_shard`` and saves through ``kiln.sharded_checkpoint``. Both subclass
``kiln.engine.placement.Local``, the one-process placement.

Data parallelism keeps single-process arithmetic: every rank draws the same global step batch
(``micro_batch_size x grad_accum_steps x strategy.world_size`` windows, normalised as a whole by
the job), keeps its contiguous slice (``kiln.engine.rank_batches``) and gradients are averaged
over ranks, so the step's gradient is the single-process one up to float summation order.

``session`` joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT in the environment) or, without torchrun, a group of one. Rank 0
creates the run directory and writes every shared file; the other ranks open it read-only
(``FollowerRun``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kiln.checkpoint import CheckpointInfo, load_checkpoint, load_latest_valid, save_checkpoint
from kiln.config import Config
from kiln.engine.placement import Local
from kiln.errors import ConfigError, KilnError
from kiln.launch import under_torchrun
from kiln.run import Run

DISTRIBUTED = ("ddp", "fsdp")


class DistributedFailure(KilnError):
    """A rank died, or a collective failed or timed out: the whole job stops."""


def global_batch_size(config: Config) -> int:
    """Windows per optimizer step over all ranks: micro-batch x accumulation x world size."""
    t, world = config.training, config.strategy.world_size
    return t.micro_batch_size * t.grad_accum_steps * (1 if world == "auto" else world)


# ---------------------------------------------------------------------- placements


class DataParallel(Local):
    """DistributedDataParallel replicas: gradients all-reduced (averaged) once per step."""

    strategy = "ddp"

    def __init__(self, rank: int, local_rank: int, world_size: int, backend: str) -> None:
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.backend = backend

    def device(self, device: torch.device) -> torch.device:
        if device.type != "cuda":
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def wrap(self, model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def accumulating(self, model: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        # Accumulation micro-batches skip the all-reduce; the last one reduces the sum.
        if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def save_checkpoint(
        self, ckpt_root: Path, step: int, state: dict[str, Any], meta: dict
    ) -> Path | None:
        # Replicas are identical: rank 0 writes one consolidated checkpoint.
        return save_checkpoint(ckpt_root, step, state, meta) if self.is_main else None

    def load_latest_valid(
        self,
        ckpt_root: Path,
        warn: Callable[[str], None],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        found = load_latest_valid(ckpt_root, warn) if self.is_main else None
        chosen = [str(found[0].path) if found else None]
        dist.broadcast_object_list(chosen, src=0)
        if found is not None or chosen[0] is None:
            return found
        path = Path(chosen[0])
        state, meta = load_checkpoint(path)
        return CheckpointInfo(path, int(meta["step"]), meta), state

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        gathered: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, values)
        names = sorted({name for part in gathered for name in part})
        return {
            name: sum(part.get(name, 0.0) for part in gathered) / self.world_size
            for name in names
        }

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        device = torch.device("cuda") if self.backend == "nccl" else torch.device("cpu")
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


class FullyShardedDataParallel(DataParallel):
    """FSDP2: parameters, gradients and optimizer state sharded over ranks; DCP checkpoints."""

    strategy = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (self.world_size,))
        # Each block of a layer list is its own unit (gathered just before it runs); the
        # root unit holds the rest (embeddings, tied head, final norm).
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def accumulating(self, model: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        # Gradients are reduce-scattered after every micro-batch: keeping them unsharded
        # across accumulation would cost the memory FSDP exists to save.
        return contextlib.nullcontext()

    def model_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from kiln.sharded_checkpoint import sharded_state

        return sharded_state(model, optimizer)

    def load_model_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        from kiln.sharded_checkpoint import load_sharded_state

        load_sharded_state(model, optimizer, state)

    def save_checkpoint(
        self, ckpt_root: Path, step: int, state: dict[str, Any], meta: dict
    ) -> Path | None:
        from kiln.sharded_checkpoint import save_sharded

        return save_sharded(ckpt_root, step, state, meta, is_main=self.is_main)

    def load_latest_valid(
        self,
        ckpt_root: Path,
        warn: Callable[[str], None],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        from kiln.sharded_checkpoint import read_sharded_state

        found = super().load_latest_valid(ckpt_root, warn, model, optimizer)
        if found is None:
            return None
        info, state = found
        return info, read_sharded_state(info.path, state, model, optimizer)


# ---------------------------------------------------------------------- the process group


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={os.environ[name]!r} is not an integer"
        ) from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def session(config: Config) -> Iterator[Local]:
    """The placement of this process for ``config``; joins and leaves the process group.

    Distributed failures inside (a dead rank, a timed-out collective) leave as
    ``DistributedFailure`` with what to do next.
    """
    world = _env_int("WORLD_SIZE", 1)
    name = config.strategy.name
    if name not in DISTRIBUTED:
        if world > 1:
            raise ConfigError(
                f"strategy.name is {name!r} but {world} processes were launched "
                "(WORLD_SIZE); set strategy.name: ddp or fsdp to train data-parallel"
            )
        yield Local()
        return
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = backend_for(config)
    init = None  # torchrun's agent (even for one worker), or another launcher, names the store
    if under_torchrun():
        _stop_with_the_launcher()
    elif world == 1:
        # A group of one meets no other rank: a free local port, whatever MASTER_ADDR or
        # MASTER_PORT a shell exported.
        init = f"tcp://127.0.0.1:{_free_port()}"
    elif "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            f"WORLD_SIZE is {world} but MASTER_ADDR is not set, so the ranks cannot meet; "
            "launch with `kiln ... --nproc N` or torchrun, or unset WORLD_SIZE for one process"
        )
    dist.init_process_group(
        backend,
        init_method=init,
        rank=rank,
        world_size=world,
        timeout=dt.timedelta(seconds=config.strategy.timeout_s),
    )
    cls = FullyShardedDataParallel if name == "fsdp" else DataParallel
    try:
        with _sigterm_deferred():
            yield cls(rank, local_rank, world, backend)
        # Ranks finish at different times (rank 0 writes the last checkpoint and the summary);
        # the teardown below closes every connection, so it waits until all ranks are done.
        dist.barrier()
    except (dist.DistError, RuntimeError) as exc:
        if not _collective_failure(exc):
            raise
        raise DistributedFailure(
            f"rank {rank} of {world}: a collective failed ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0]}). Another rank probably died or hung longer "
            f"than strategy.timeout_s ({config.strategy.timeout_s:g} s): see its output. The run "
            "stopped; if it had trained a step, rank 0 logged the `kiln resume` command that "
            "continues from the last checkpoint (the world size may change)."
        ) from exc
    finally:
        dist.destroy_process_group()


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _stop_with_the_launcher() -> None:
    """Stop this torchrun worker as on one SIGTERM when its agent dies, even by SIGKILL: it then
    checkpoints and stops, instead of training on unsupervised and holding the run's lock.

    Linux sends the death signal once per parent *thread* that ends, so a multithreaded agent's
    death can arrive twice, which a stop would take for a second Ctrl-C. The death signal is
    therefore SIGUSR1, turned into a single SIGTERM here. Where there is no prctl nothing
    changes.
    """
    name = ctypes.util.find_library("c")
    prctl = getattr(ctypes.CDLL(name), "prctl", None) if name else None
    if prctl is None:
        return
    stopping: list[bool] = []

    def launcher_died(_signum: int, _frame: FrameType | None) -> None:
        if not stopping:
            stopping.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR1, launcher_died)
    prctl(_PR_SET_PDEATHSIG, signal.SIGUSR1)


@contextlib.contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """Outside the loop's own handler, a first SIGTERM is noted rather than fatal.

    torchrun sends SIGTERM to every rank as soon as one ends with a non-zero code: one that
    failed, or one that stopped on a signal and exits 130 a moment before the others. The
    survivors are then unwinding the collective's error, or reporting their own stop, and must
    live long enough to mark the run and print why, and end with their own exit code. A second
    SIGTERM interrupts; torchrun's SIGKILL after its grace period bounds the rest.
    """
    received: list[int] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    try:
        previous = signal.signal(signal.SIGTERM, note)
    except ValueError:  # not the main thread: the caller owns signals
        yield
        return
    try:
        yield
    finally:
        # A torchrun worker ends as soon as it has reported how training ended: keep noting the
        # first SIGTERM until then, or the report dies with it (exit -15, which torchrun and
        # `--nproc` take for a crash even after a clean stop).
        if not under_torchrun():
            signal.signal(signal.SIGTERM, previous)


def _collective_failure(exc: BaseException) -> bool:
    """Whether an error comes from the process group (gloo and NCCL raise RuntimeErrors)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection closed by peer"))


def backend_for(config: Config) -> str:
    """The torch.distributed backend of a resolved config ('auto': nccl on CUDA, gloo on CPU)."""
    cuda = config.hardware.device == "cuda"
    backend = config.strategy.backend
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ConfigError("strategy.backend nccl needs hardware.device: cuda; use gloo on CPU")
    return backend


def resolve_world(config: Config, world_size: int) -> Config:
    """Pin ``strategy.world_size`` to the launched world size when it is 'auto'."""
    if config.strategy.world_size != "auto":
        return config
    resolved = config.model_copy(deep=True)
    resolved.strategy.world_size = world_size
    return resolved


def check_world(config: Config, world_size: int) -> None:
    """Raise ``ConfigError`` unless this world size splits the config's global batch evenly."""
    total = global_batch_size(config)
    if total % world_size:
        raise ConfigError(
            f"the global batch of {total} windows (training.micro_batch_size "
            f"{config.training.micro_batch_size} x grad_accum_steps "
            f"{config.training.grad_accum_steps} x strategy.world_size "
            f"{config.strategy.world_size}) does not split over {world_size} "
            f"processes; launch a world size that divides {total}"
        )


# ---------------------------------------------------------------------- the run directory


class FollowerRun(Run):
    """A non-zero rank's view of the run directory: it reads the run and never writes it."""

    def __init__(self, path: Path, config: Config, *, echo: bool = True) -> None:
        self.path = path
        self.config = config
        self.echo = False
        self.checkpoints = path / "checkpoints"

    def claim(self) -> None:
        pass  # rank 0 holds the run's lock for the whole job

    def check_inputs(self) -> None:
        pass  # rank 0 checks them

    def note_software_changes(self) -> None:
        pass  # rank 0 notes them

    def log(self, message: str, *, echo: bool = True) -> None:
        pass

    def write_metrics(self, row: dict[str, Any]) -> None:
        pass

    def set_status(self, status: str) -> None:  # type: ignore[override]
        pass

    def truncate_metrics_after(self, step: int) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def run_class() -> type[Run]:
    """``Run`` on rank 0 (or without torchrun), ``FollowerRun`` on the other ranks."""
    return FollowerRun if _env_int("RANK", 0) > 0 else Run


def create_run(config: Config, placement: Local, *, echo: bool) -> Run:
    """Rank 0 creates the run directory; the others open the one it created."""
    run = Run.create(config, echo=echo) if placement.is_main else None
    if placement.world_size == 1:
        return run
    path = [str(run.path) if run is not None else None]
    dist.broadcast_object_list(path, src=0)
    return run if run is not None else FollowerRun.open(Path(path[0]))
