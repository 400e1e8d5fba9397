"""Data-parallel training on CPU with gloo: DDP and FSDP against single-process training,
elastic resume across world sizes, a dead rank, and the pieces they are made of.

The end-to-end tests launch real torchrun jobs of 2 processes on the smoke config (1 thread per
rank). Equivalence is checked on the weights of the final checkpoint; the consumed windows on
the per-rank sample-id logs (``logging.sample_ids``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kiln import workflows
from kiln.checkpoint import list_checkpoints, load_checkpoint
from kiln.config import Config, load_config
from kiln.engine.distributed import (
    _free_port,
    check_world,
    global_batch_size,
    resolve_world,
    session,
)
from kiln.errors import ConfigError
from kiln.run import Run, read_metrics
from kiln.sharded_checkpoint import with_full_model

ConfigFactory = Callable[..., Config]
MAX_STEPS = 30


def _overrides(root: Path, cache: Path, *extra: str) -> list[str]:
    return [
        f"run.root={root}", f"data.cache_dir={cache}", "hardware.device=cpu",
        "hardware.threads=1", "logging.sample_ids=true", "training.micro_batch_size=4",
        f"training.max_steps={MAX_STEPS}", "checkpoint.every_steps=10", *extra,
    ]


def _sets(overrides: list[str]) -> list[str]:
    return [x for item in overrides for x in ("--set", item)]


def _env(**extra: str) -> dict[str, str]:
    """This environment with Kiln's sources importable, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), **extra}


def _kiln(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=_env())


def _start(*args: str) -> subprocess.Popen:
    """A kiln command in its own session, so that the whole job can be killed at once."""
    return subprocess.Popen([sys.executable, "-m", "kiln", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)


def _only_run(root: Path) -> Path:
    (run,) = root.iterdir()
    return run


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"step_{MAX_STEPS:08d}"
    state, _ = load_checkpoint(path)
    return with_full_model(path, state)["model"]


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _windows_by_step(run: Path) -> dict[int, list[list]]:
    """Per step, the windows of all ranks in rank order; checks ranks never share a window."""
    steps: dict[int, dict[int, list]] = {}
    for path in sorted((run / "samples").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], {})[rank] = row["windows"]
    merged = {}
    for step, ranks in steps.items():
        windows = [w for rank in sorted(ranks) for w in ranks[rank]]
        assert len({tuple(w) for w in windows}) == len(windows), f"overlap at step {step}"
        merged[step] = windows
    return merged


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def _wait_for_checkpoint(proc: subprocess.Popen, root: Path, timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(root.glob("*/checkpoints/step_*")) if root.exists() else []
        if found:
            return found[0].parent.parent
        if proc.poll() is not None:
            raise AssertionError(f"training ended before a checkpoint: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a job: its process and torchrun's workers (each in a session of its own)."""
    for pid in _children(proc.pid):
        os.killpg(int(pid), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _worker_pid(agent: int, rank: int) -> int:
    """The pid of the torchrun worker of ``rank`` (Linux /proc)."""
    children = _children(agent)
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


# ---------------------------------------------------------------------- reference runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shard_cache: Path) -> dict[str, Path]:
    """Single process (micro-batch 8, and 4 x 2 accumulation) and DDP/FSDP 2 ranks x 4."""
    root = tmp_path_factory.mktemp("dist-runs")
    made = {}
    for name, extra in {
        "single_8": ["training.micro_batch_size=8"],
        "single_4x2": ["training.grad_accum_steps=2"],
    }.items():
        config = load_config("smoke", _overrides(root / name, shard_cache, *extra))
        made[name] = workflows.train(config, echo=False).run_dir
    for strategy in ("ddp", "fsdp"):
        sets = _sets(_overrides(root / strategy, shard_cache, f"strategy.name={strategy}"))
        done = _kiln("train", "--nproc", "2", "--config", "smoke", *sets)
        assert done.returncode == 0, done.stderr[-10_000:]
        made[strategy] = _only_run(root / strategy)
    return made


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(runs: dict[str, Path], strategy: str) -> None:
    """2 ranks x micro-batch 4 against one process with micro-batch 8 on the same data.

    Against 4 x 2 accumulation in one process DDP is bit-identical: each rank's backward is
    that micro-batch's backward, averaging two gradients (a sum, then a halving) rounds exactly
    like accumulating two halves, and every rank clips with the norm of the whole gradient.
    FSDP forms that norm from each rank's shard of every gradient, so when clipping engages
    (it does in these runs' first steps) the norm can round differently in its last bit;
    ``test_fsdp_without_clipping_matches_one_process_bit_for_bit`` shows the rest is exact.
    Against micro-batch 8 the only difference is float summation order inside the batched
    matmuls, which the same comparison between the two single-process runs measures: the
    distributed run may differ by no more than that.
    """
    dist_run = runs[strategy]
    weights = _final_weights(dist_run)
    single_8, single_4x2 = _final_weights(runs["single_8"]), _final_weights(runs["single_4x2"])
    reassociation = _max_abs_diff(single_8, single_4x2)
    diff = _max_abs_diff(weights, single_8)
    print(f"{strategy}: max |w - w_single8| = {diff:.3g} (single 8 vs 4x2: {reassociation:.3g})")
    if strategy == "ddp":
        assert _max_abs_diff(weights, single_4x2) == 0.0
    assert diff <= max(reassociation, 1e-6) and diff < 1e-4
    assert _windows_by_step(dist_run) == _windows_by_step(runs["single_8"])
    single_losses, losses = _losses(runs["single_8"]), _losses(dist_run)
    assert sorted(losses) == sorted(single_losses)
    assert all(abs(losses[s] - single_losses[s]) < 1e-5 for s in losses)
    meta = list_checkpoints(dist_run / "checkpoints")[-1].meta
    assert (meta["strategy"], meta["world_size"], meta["backend"]) == (strategy, 2, "gloo")
    assert "world size 2, backend gloo" in (dist_run / "train.log").read_text()


def test_fsdp_checkpoint_is_sharded_and_exports_whole(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = list_checkpoints(runs["fsdp"] / "checkpoints")[-1].path
    shards = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"sharded/__0_0.distcp", "sharded/.metadata"} <= set(manifest["files"])
    bundle = workflows.export_run(runs["fsdp"], tmp_path / "bundle", "latest")
    from safetensors.torch import load_file

    exported = load_file(bundle / "model.safetensors")
    assert _max_abs_diff(exported, _final_weights(runs["fsdp"])) == 0.0


def test_fsdp_without_clipping_matches_one_process_bit_for_bit(
    shard_cache: Path, tmp_path: Path
) -> None:
    """Without a global norm to form from shards, FSDP's step is exactly one process's."""
    extra = "training.grad_clip=0"
    single = workflows.train(load_config("smoke", _overrides(
        tmp_path / "single", shard_cache, "training.grad_accum_steps=2", extra)), echo=False)
    done = _kiln("train", "--nproc", "2", "--config", "smoke", *_sets(_overrides(
        tmp_path / "fsdp", shard_cache, "strategy.name=fsdp", extra)))
    assert done.returncode == 0, done.stderr[-10_000:]
    fsdp = _final_weights(_only_run(tmp_path / "fsdp"))
    assert _max_abs_diff(fsdp, _final_weights(single.run_dir)) == 0.0


@pytest.mark.parametrize(
    "strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)]
)
def test_bf16_with_accumulation_matches_single_process(
    shard_cache: Path, tmp_path: Path, strategy: str
) -> None:
    """bf16, 2 ranks x micro-batch 2 x 2 accumulation (DDP skips the all-reduce on the first).

    bf16 rounds every matmul, so how a step's batch is cut changes the weights far more than in
    fp32; the bound is that change within one process (micro-batch 8 against 2 x 4).
    """
    bf16 = ["precision.dtype=bf16", "training.micro_batch_size=2"]
    single = {}
    for name, extra in {"2x4": ["training.grad_accum_steps=4"],
                        "8": ["training.micro_batch_size=8"]}.items():
        config = load_config("smoke", _overrides(tmp_path / name, shard_cache, *bf16, *extra))
        single[name] = _final_weights(workflows.train(config, echo=False).run_dir)
    sets = _sets(_overrides(tmp_path / strategy, shard_cache, *bf16,
                            "training.grad_accum_steps=2", f"strategy.name={strategy}"))
    done = _kiln("train", "--nproc", "2", "--config", "smoke", *sets)
    assert done.returncode == 0, done.stderr[-10_000:]
    diff = _max_abs_diff(_final_weights(_only_run(tmp_path / strategy)), single["2x4"])
    resplit = _max_abs_diff(single["8"], single["2x4"])
    print(f"{strategy} bf16: max |w - w_single2x4| = {diff:.3g} (single 8 vs 2x4: {resplit:.3g})")
    assert 0 < resplit < 0.1 and diff <= resplit


# ---------------------------------------------------------------------- elastic resume


@pytest.mark.parametrize(
    ("strategy", "first", "then"),
    [("ddp", 2, 1), ("ddp", 1, 2), pytest.param("fsdp", 2, 1, marks=pytest.mark.slow)],
)
def test_elastic_resume_keeps_the_global_data_order(
    runs: dict[str, Path], shard_cache: Path, tmp_path: Path, strategy: str, first: int,
    then: int,
) -> None:
    """Kill a job after its first checkpoint; resume it with another world size."""
    accum = 2 // first  # the global batch stays 8 windows: 4 x accumulation x world size
    sets = _sets(_overrides(tmp_path / "runs", shard_cache, f"strategy.name={strategy}",
                            f"training.grad_accum_steps={accum}"))
    # One process runs without torchrun (a process group of one), several through it.
    launch = ["--nproc", str(first)] if first > 1 else []
    proc = _start("train", *launch, "--config", "smoke", *sets)
    run = _wait_for_checkpoint(proc, tmp_path / "runs")
    _kill_job(proc)
    resumed = _kiln("resume", str(run), *(["--nproc", str(then)] if then > 1 else []))
    assert resumed.returncode == 0, resumed.stderr[-10_000:]
    assert (run / "status").read_text().strip() == "completed"
    assert f"world size {then}" in (run / "train.log").read_text()

    straight = runs[strategy]
    assert _windows_by_step(run) == _windows_by_step(straight)
    losses, straight_losses = _losses(run), _losses(straight)
    assert sorted(losses) == sorted(straight_losses)
    assert all(abs(losses[s] - straight_losses[s]) < 1e-5 for s in losses)
    diff = _max_abs_diff(_final_weights(run), _final_weights(straight))
    print(f"{strategy} {first}->{then}: max |w - w_uninterrupted| = {diff:.3g}")
    assert diff < 1e-5


# ---------------------------------------------------------------------- a rank dies


def test_dead_rank_fails_the_job_and_it_resumes(
    runs: dict[str, Path], shard_cache: Path, tmp_path: Path
) -> None:
    sets = _sets(_overrides(tmp_path / "runs", shard_cache, "strategy.name=ddp",
                            "strategy.timeout_s=60"))
    proc = _start("train", "--nproc", "2", "--config", "smoke", *sets)
    run = _wait_for_checkpoint(proc, tmp_path / "runs")
    assert proc.poll() is None, "training finished before the kill: lengthen the run"
    os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
    # Bounded: well under the collective timeout plus torchrun's grace period.
    proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert proc.returncode != 0
    assert (run / "status").read_text().strip() == "failed"
    assert "Another rank probably died" in stderr
    assert f"continue with: kiln resume {run} --nproc 2" in stderr
    resumed = _kiln("resume", str(run), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-10_000:]
    assert _windows_by_step(run) == _windows_by_step(runs["ddp"])
    assert _max_abs_diff(_final_weights(run), _final_weights(runs["ddp"])) == 0.0


def test_workers_whose_launcher_is_killed_checkpoint_and_stop(
    shard_cache: Path, tmp_path: Path
) -> None:
    sets = _sets(_overrides(tmp_path / "runs", shard_cache, "strategy.name=ddp"))
    proc = _start("train", "--nproc", "2", "--config", "smoke", *sets)
    run = _wait_for_checkpoint(proc, tmp_path / "runs")
    workers = [_worker_pid(proc.pid, rank) for rank in (0, 1)]
    proc.send_signal(signal.SIGKILL)  # torchrun's agent itself: it cannot pass anything on
    proc.wait(timeout=30)
    deadline = time.monotonic() + 120
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "the workers outlived their launcher"
        time.sleep(0.1)
    log = (run / "train.log").read_text()
    assert (run / "status").read_text().strip() == "interrupted", log
    assert "stopped by signal 15" in log, log
    Run.open(run, echo=False).claim()  # the lock went with them


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(
    runs: dict[str, Path], shard_cache: Path, tmp_path: Path
) -> None:
    sets = _sets(_overrides(tmp_path / "runs", shard_cache, "strategy.name=ddp"))
    proc = _start("train", "--nproc", "2", "--config", "smoke", *sets)
    run = _wait_for_checkpoint(proc, tmp_path / "runs")
    assert proc.poll() is None, "training finished before the signal: lengthen the run"
    os.kill(_worker_pid(proc.pid, 0), signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 130, proc.stderr.read()[-10_000:]
    assert (run / "status").read_text().strip() == "interrupted"
    log = (run / "train.log").read_text()
    assert "stopped by signal 15" in log and "run ended" not in log
    resumed = _kiln("resume", str(run), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-10_000:]
    assert _windows_by_step(run) == _windows_by_step(runs["ddp"])
    assert _max_abs_diff(_final_weights(run), _final_weights(runs["ddp"])) == 0.0


_STOPPED_FIRST_BY_ANOTHER_RANK = """
import os, signal
from kiln.engine.distributed import _sigterm_deferred
with _sigterm_deferred():
    pass  # training stopped on a signal, checkpointed and left the process group
os.kill(os.getpid(), signal.SIGTERM)  # torchrun's, as another rank has just exited 130
print("status: interrupted")
raise SystemExit(130)
"""


def test_a_worker_reports_its_stop_though_torchrun_terminates_it_after_another_rank() -> None:
    done = subprocess.run([sys.executable, "-c", _STOPPED_FIRST_BY_ANOTHER_RANK],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=_env(TORCHELASTIC_RUN_ID="test"))
    assert (done.returncode, done.stdout) == (130, "status: interrupted\n"), done.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_gpu_rank_with_nccl_matches_single_process(
    shard_cache: Path, tmp_path: Path, strategy: str
) -> None:
    """One rank on a GPU (nccl, no torchrun) against plain single-process training on it."""
    done = {}
    for name in ("single", strategy):
        overrides = _overrides(tmp_path / name, shard_cache, "hardware.device=cuda",
                               f"strategy.name={name}")
        done[name] = workflows.train(load_config("smoke", overrides), echo=False).run_dir
    assert "backend nccl" in (done[strategy] / "train.log").read_text()
    assert _max_abs_diff(_final_weights(done[strategy]), _final_weights(done["single"])) == 0.0


# ---------------------------------------------------------------------- the pieces


def test_world_size_must_split_the_global_batch(smoke_config: ConfigFactory) -> None:
    config = resolve_world(smoke_config("strategy.name=ddp", "training.grad_accum_steps=3"), 2)
    assert config.strategy.world_size == 2 and global_batch_size(config) == 48
    check_world(config, 3)
    with pytest.raises(ConfigError, match="does not split over 5 processes"):
        check_world(config, 5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.name=fsdp", "optimizer.l2=0.1"], "optimizer.l1/l2"),
        (["strategy.name=fsdp", "eval.suites=[ppl, compile]"], "eval.suites"),
        (["strategy.name=ddp", "job=hashtron"], "gradient jobs only"),
        (["strategy.name=ddp", "job=nca"], "state pool"),
        (["strategy.name=fsdp", "job=lattice"], "state pool"),
        (["strategy.name=streaming", "hardware.keep_freed_memory=true"], "keep_freed_memory"),
    ],
)
def test_unsupported_combinations_are_config_errors(
    smoke_config: ConfigFactory, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        smoke_config(*overrides)


def test_single_strategy_refuses_several_processes(
    smoke_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"strategy\.name: ddp or fsdp"):
        workflows.train(smoke_config(), echo=False)


@pytest.mark.parametrize("port", ["unset", "busy"])
def test_a_group_of_one_ignores_a_master_address_a_shell_exported(
    smoke_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch, port: str
) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if port == "busy":
            monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        else:
            monkeypatch.delenv("MASTER_PORT", raising=False)
        with session(smoke_config("strategy.name=ddp")) as placement:
            assert placement.world_size == 1
            assert placement.any(True)


_ONE_WORKER = """
from kiln.config import load_config
from kiln.engine.distributed import session
config = load_config("smoke", ["strategy.name=ddp", "strategy.timeout_s=20"])
with session(config) as placement:
    print("world", placement.world_size, placement.any(True))
"""


def test_one_torchrun_worker_joins_the_store_of_its_agent(tmp_path: Path) -> None:
    script = tmp_path / "one_worker.py"
    script.write_text(_ONE_WORKER)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
         str(script)],
        capture_output=True, text=True, timeout=120, check=False, env=_env(),
    )
    assert "world 1 True" in done.stdout, done.stderr[-5_000:]


def test_several_ranks_without_a_meeting_point_are_refused_at_once(
    smoke_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    config = smoke_config("strategy.name=ddp", "strategy.timeout_s=5")
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"), session(config):
        pass


_SLOW_RANK_0 = """
import time
from kiln.config import load_config
from kiln.engine.distributed import session
with session(load_config("smoke", ["strategy.name=ddp", "hardware.device=cpu"])) as placement:
    if placement.rank == 0:
        time.sleep(2)
        print("rank 0 done", time.time())
print("left", time.time())
"""


def test_no_rank_leaves_the_process_group_before_every_rank_is_done() -> None:
    # Rank 0 finishes last (it writes the final checkpoint); rank 1 must wait for it.
    port = str(_free_port())
    ranks = [
        subprocess.Popen([sys.executable, "-c", _SLOW_RANK_0], stdout=subprocess.PIPE, text=True,
                         env=_env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                  RANK=str(r), LOCAL_RANK=str(r)))
        for r in (0, 1)
    ]
    out = [proc.communicate(timeout=120)[0] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], out
    times = [dict(line.rsplit(" ", 1) for line in text.splitlines()) for text in out]
    assert float(times[1]["left"]) >= float(times[0]["rank 0 done"])
