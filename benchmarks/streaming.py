"""Out-of-core training (``strategy.name: streaming``) against the disk's bound and against memory.

What is measured, in one run
    1. The sequential write and read bandwidth of the filesystem that holds the chunk store:
       ``--probe-mib`` written in 8 MiB blocks with direct I/O (``O_DIRECT``, as the store writes)
       and fsynced, into a new file and again over its allocated blocks (the store overwrites
       recycled files; the bound takes the faster write), then read back the same way; median
       of 3. It is measured just before and just after each I/O-bound run (a shared machine's
       disk drifts) and the bound uses the mean.
    2. I/O-bound regime: a GPT whose weights + AdamW state are >= 4x the memory budget, trained
       with one short window per step, with 1 and with 2 compute threads; the store's direct I/O
       (``strategy.direct_io``, the default) bypasses the page cache, so every read comes from
       the disk. Per step: achieved step time against the bound ``bytes read / read bandwidth +
       bytes written / write bandwidth`` (reads and writes share one device), the bytes
       moved per parameter, the share of the step with a read or write in progress
       (``stream_io_busy_sec``) and the rate bytes moved meanwhile.
    3. Compute-bound regime: the same GPT with a large batch, streamed under a budget that
       holds every chunk (``auto``) against in-memory training (``strategy.name: single``) of
       the same config; with the default clipping and with ``grad_clip: 0``.
    ``--throttle READ,WRITE`` (MiB/s, root only) runs everything under a block-I/O limit on the
    store's disk (a cgroup: v2 ``io.max`` or v1 ``blkio.throttle``), for two reasons: a shared
    virtual disk's own speed drifts by 2x from minute to minute, which makes a fraction of its
    bound say more about the minute than about the executor; and a limited disk is what
    streaming is for. The limits are per direction, so reads and writes can both run at their
    limit at once: under a throttle the bound is ``max(bytes read / read bandwidth, bytes
    written / write bandwidth)`` (stricter than the sum).
The first step of each run is a warm-up and is not counted; step time is the trainer's own
per-step time (``tokens_per_sec`` in metrics.jsonl), which for streaming includes waiting for every
read the step needs and for any earlier write of a chunk it updates (a step's writes and its commit
overlap the next step).

Options: ``--store DIR`` (where runs and the chunk store go; default a temporary folder under
``/tmp``), ``--steps`` (counted steps per run), ``--probe-mib``, ``--throttle``, ``--json FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kiln.run import read_metrics

# The compute-bound model; the I/O-bound one has the same state in 4x smaller chunks, so that a
# 64 MiB budget holds several chunks and reads can run ahead of the computation.
SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = ["model.d_model=512", "model.n_layers=8", "model.n_heads=8"]
IO_MODEL = ["model.d_model=256", "model.n_layers=32", "model.n_heads=4"]


def disk_bandwidth(folder: Path, mib: int) -> dict[str, float]:
    """Bytes/s of sequential 8 MiB blocks with direct I/O: written into a new file
    (``new``), over that file's allocated blocks (``over``), and read back (``read``)."""
    block = mmap.mmap(-1, 8 << 20)  # page-aligned, as direct I/O needs
    block.write(os.urandom(8 << 20))
    path = folder / "bandwidth.probe"
    rates: dict[str, list[float]] = {"new": [], "over": [], "read": []}

    def timed(kind: str, flags: int) -> None:
        fd = os.open(path, flags | os.O_DIRECT)
        started = time.perf_counter()
        if kind == "read":
            while os.readv(fd, [block]):
                pass
        else:
            for _ in range(mib // 8):
                os.write(fd, block)
            os.fsync(fd)
        rates[kind].append((mib << 20) / (time.perf_counter() - started))
        os.close(fd)

    for _ in range(3):
        timed("new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        timed("over", os.O_WRONLY)
        timed("read", os.O_RDONLY)
    path.unlink()
    return {kind: statistics.median(values) for kind, values in rates.items()}


def whole_disk(folder: Path) -> str:
    """``major:minor`` of the disk (not the partition) that holds ``folder``: what cgroups limit."""
    dev = os.stat(folder).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sys_dev.exists():
        sys.exit(f"--throttle: {folder} is not on a block device (tmpfs? overlay?); choose a "
                 "--store on a disk")
    if (sys_dev / "partition").exists():
        sys_dev = sys_dev.resolve().parent
    return (sys_dev / "dev").read_text().strip()


@contextlib.contextmanager
def throttled(folder: Path, read_mib: int, write_mib: int) -> Iterator[None]:
    """Run this process, and the processes it starts, under read and write limits (MiB/s)
    on the disk that holds ``folder``."""
    disk, rbps, wbps = whole_disk(folder), read_mib << 20, write_mib << 20
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    if controllers.exists() and "io" in controllers.read_text().split():  # cgroup v2
        home = controllers.parent
        group = home / "kiln-bench"
        writes = [(home / "cgroup.subtree_control", "+io"),
                  (group / "io.max", f"{disk} rbps={rbps} wbps={wbps}")]
    else:
        home = Path("/sys/fs/cgroup/blkio")
        group = home / "kiln-bench"
        writes = [(group / "blkio.throttle.read_bps_device", f"{disk} {rbps}"),
                  (group / "blkio.throttle.write_bps_device", f"{disk} {wbps}")]
    try:
        group.mkdir(exist_ok=True)
        for path, value in [*writes, (group / "cgroup.procs", str(os.getpid()))]:
            path.write_text(value)
    except OSError as exc:
        sys.exit(f"--throttle needs root and a cgroup with the block-I/O controller at {group}: "
                 f"{exc}")
    try:
        yield
    finally:
        (home / "cgroup.procs").write_text(str(os.getpid()))
        group.rmdir()


def train_rows(
    root: Path, overrides: list[str], steps: int, model: list[str] = MODEL
) -> tuple[list[dict], int]:
    """Metrics rows of the counted steps of a fresh run, and the model's parameter count.

    Each run is its own `kiln train` process: a streamed run tunes the process's allocator.
    """
    sets = [f"run.root={root}", f"data.cache_dir={root.parent / 'cache'}", "hardware.device=cpu",
            f"training.max_steps={steps + 1}", "eval.every_steps=0", "sample.max_new_tokens=0",
            "logging.every_steps=1", "schedule.warmup_steps=1", *model, *overrides]
    command = [sys.executable, "-m", "kiln", "train", "--config", "smoke"]
    earlier = set(root.iterdir()) if root.exists() else set()  # runs of an earlier invocation
    subprocess.run([*command, *[x for s in sets for x in ("--set", s)]], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(SRC)})
    (run,) = set(root.iterdir()) - earlier
    params = int(next(
        line.split("GPT ")[1].split(" parameters")[0].replace(",", "")
        for line in (run / "train.log").read_text().splitlines() if "parameters;" in line
    ))
    rows = [r for r in read_metrics(run) if "loss" in r and r["step"] > 1]
    return rows, params


def step_seconds(row: dict, tokens: int) -> float:
    return tokens / row["tokens_per_sec"]


def io_bound(
    root: Path, steps: int, probe_mib: int, threads: int, throttled: bool
) -> dict[str, Any]:
    """The I/O-bound run; the disk is measured just before and just after it (it drifts on a
    shared machine) and the bound uses the mean of the two."""
    seq, budget = 8, 64 << 20
    before = disk_bandwidth(root, probe_mib)
    rows, params = train_rows(root / f"io-{threads}", [
        f"data.seq_len={seq}", "training.micro_batch_size=1", "strategy.name=streaming",
        f"strategy.memory_budget={budget}", "strategy.prefetch_chunks=3",
        f"hardware.threads={threads}",
    ], steps, IO_MODEL)
    after = disk_bandwidth(root, probe_mib)
    disk = {kind: statistics.mean((before[kind], after[kind])) for kind in before}
    # The store overwrites recycled files where it can: bound writes by the faster way.
    write_bw, read_bw = max(disk["new"], disk["over"]), disk["read"]
    achieved = [step_seconds(r, seq) for r in rows]
    # One device serves reads and writes in turn: their times add up. Under per-direction
    # limits both can run at their limit at once, and the slower direction is the bound.
    combine = max if throttled else sum
    bound = [combine((r["stream_bytes_read"] / read_bw, r["stream_bytes_written"] / write_bw))
             for r in rows]
    moved = [(r["stream_bytes_read"] + r["stream_bytes_written"]) / params for r in rows]
    return {
        "disk_before": before, "disk_after": after, "threads": threads, "params": params,
        "bound": "slower direction" if throttled else "reads + writes",
        "state_bytes": 12 * params, "budget": budget,
        "tokens_per_step": seq,
        "step_sec": statistics.median(achieved), "bound_sec": statistics.median(bound),
        "fraction_of_bound": statistics.median(b / a for b, a in zip(bound, achieved,
                                                                     strict=True)),
        "bytes_per_param_per_step": statistics.median(moved),
        "read_per_param": statistics.median(r["stream_bytes_read"] / params for r in rows),
        "write_per_param": statistics.median(r["stream_bytes_written"] / params for r in rows),
        "io_wait_sec": statistics.median(r["stream_io_wait_sec"] for r in rows),
        # How much of the step the store kept the disk busy, and at what rate it moved bytes
        # then: below the probed bandwidth means reads and writes slowed each other down.
        "io_busy_fraction": statistics.median(
            r["stream_io_busy_sec"] / a for r, a in zip(rows, achieved, strict=True)),
        "busy_bandwidth": statistics.median(
            (r["stream_bytes_read"] + r["stream_bytes_written"]) / r["stream_io_busy_sec"]
            for r in rows),
    }


def compute_bound(root: Path, steps: int, clip: float) -> dict[str, Any]:
    seq, micro = 128, 8
    common = [f"data.seq_len={seq}", f"training.micro_batch_size={micro}",
              f"training.grad_clip={clip}"]
    memory, _ = train_rows(root / f"mem-{clip}", common, steps)
    streamed, _ = train_rows(root / f"stream-{clip}", [*common, "strategy.name=streaming",
                                                       "strategy.memory_budget=auto"], steps)
    tokens = seq * micro
    mem = [step_seconds(r, tokens) for r in memory]
    stream = [step_seconds(r, tokens) for r in streamed]
    # On a shared machine the fastest step is the least disturbed one: report it with the median.
    return {"grad_clip": clip, "tokens_per_step": tokens,
            "memory_step_sec": statistics.median(mem), "memory_min_sec": min(mem),
            "streaming_step_sec": statistics.median(stream), "streaming_min_sec": min(stream),
            "ratio": statistics.median(stream) / statistics.median(mem),
            "ratio_of_min": min(stream) / min(mem),
            "identical_losses": [r["loss"] for r in memory] == [r["loss"] for r in streamed]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--probe-mib", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--io-only", action="store_true", help="skip the compute-bound runs")
    parser.add_argument("--throttle", default=None, metavar="READ,WRITE",
                        help="limit the store's disk to these MiB/s (root; see the docstring)")
    args = parser.parse_args()
    root = args.store or Path(tempfile.mkdtemp(prefix="kiln-stream-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    with contextlib.ExitStack() as stack:
        if args.throttle:
            read_mib, write_mib = (int(x) for x in args.throttle.split(","))
            stack.enter_context(throttled(root, read_mib, write_mib))
            print(f"disk {whole_disk(root)} throttled to {read_mib} MiB/s read, "
                  f"{write_mib} MiB/s write")
        # With one compute thread the I/O threads keep a core of their own on a small machine.
        io = [io_bound(root, args.steps, args.probe_mib, threads, bool(args.throttle))
              for threads in (1, 2)]
    for r in io:
        disk = "; ".join(
            f"{when} write {d['new'] / 2**20:.0f} new / {d['over'] / 2**20:.0f} over, "
            f"read {d['read'] / 2**20:.0f} MiB/s"
            for when, d in (("before", r["disk_before"]), ("after", r["disk_after"])))
        print(f"I/O-bound, {r['threads']} compute threads: disk at {root} {disk}")
        print(f"I/O-bound, {r['threads']} compute threads: {r['params']:,} params "
              f"({r['state_bytes'] / 2**20:.0f} MiB of state), budget {r['budget'] >> 20} MiB: "
              f"step {r['step_sec']:.2f} s, bound {r['bound_sec']:.2f} s -> "
              f"{100 * r['fraction_of_bound']:.0f}% of the bound ({r['bound']}); "
              f"waited {r['io_wait_sec']:.2f} s for I/O; {r['read_per_param']:.1f} B read + "
              f"{r['write_per_param']:.1f} B written per param; I/O in progress "
              f"{100 * r['io_busy_fraction']:.0f}% of the step, moving "
              f"{r['busy_bandwidth'] / 2**20:.0f} MiB/s meanwhile")
    compute = [] if args.io_only else [compute_bound(root, args.steps, c) for c in (1.0, 0.0)]
    for c in compute:
        print(f"compute-bound, grad_clip {c['grad_clip']}: {c['tokens_per_step']} tokens/step, "
              f"in memory {c['memory_step_sec']:.2f} s (min {c['memory_min_sec']:.2f}), streaming "
              f"{c['streaming_step_sec']:.2f} s (min {c['streaming_min_sec']:.2f}) -> "
              f"{c['ratio']:.2f}x, {c['ratio_of_min']:.2f}x of minima (identical losses: "
              f"{c['identical_losses']})")
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "throttle_mib_per_sec": args.throttle, "io_bound": io, "compute_bound": compute,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
