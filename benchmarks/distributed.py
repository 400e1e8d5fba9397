"""Data-parallel throughput: Kiln's Trainer.fit() with 1 process against DDP/FSDP ranks.

Every variant runs the real ``Trainer.fit()`` in its own launch (torchrun for several ranks) on
the packaged default GPT, with the pieces of ``benchmarks/lm_throughput.py``: pre-made random
token batches, the in-memory ``BenchJob`` whose batch source and ``evaluate`` are the stopwatch
(the clock runs from the first step after warmup to the end of the last step, on rank 0; the
ranks are in lockstep through their collectives). Data-parallel variants get the same global
batches sliced by rank exactly as in training (``RankBatches``).

Variants
    CPU (default): ``single`` (one process, ``--threads`` threads), then ``ddp`` and ``fsdp``
    with ``--nproc`` ranks of ``--threads`` threads each. Each rank keeps the micro-batch, so
    the global batch grows with the ranks (weak scaling); the scaling efficiency is
    ``tokens/s(N ranks) / (N x tokens/s(1 process))``. On a machine with fewer cores than
    ranks x threads the ranks compete for cores and the efficiency says so.

    CUDA (``--device cuda``): ``single`` against ``ddp`` with ONE rank on the same GPU (nccl):
    the cost of the DDP wrapper, the per-step metric reduction and stop agreement, with the
    same work; the target is ddp/single >= 0.97. ``--nproc`` > 1 adds multi-GPU DDP/FSDP.

Variants are interleaved over ``--repeats`` rounds (order flipped every round); medians are
reported. Run ``python benchmarks/distributed.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_throughput import (  # a sibling script, not a package
    BenchJob,
    PremadeBatches,
    Spec,
    Stopwatch,
    bench_config,
    machine,
    make_batches,
)

from kiln.engine.distributed import create_run, resolve_world, session
from kiln.engine.rank_batches import partition
from kiln.engine.trainer import Trainer
from kiln.jobs.lm import build_model
from kiln.repro import set_determinism


def spec_of(args: argparse.Namespace, global_batch: int) -> Spec:
    return Spec(
        device=torch.device(args.device),
        precision=args.precision,
        threads=args.threads,
        seq_len=args.seq_len,
        micro_batch=global_batch,
        vocab=args.vocab,
        warmup=args.warmup,
        steps=args.steps,
        log_every=10,
        deterministic=True,
        seed=1337,
    )


# ---------------------------------------------------------------------- one launch


def worker(args: argparse.Namespace) -> None:
    """One rank of one variant: train, and on rank 0 write the timing to ``args.out``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    spec = spec_of(args, args.micro_batch * world)
    set_determinism(True)
    torch.set_num_threads(args.threads)
    config = bench_config(spec, Path(args.root))
    config.training.micro_batch_size = args.micro_batch
    config.strategy.name = args.strategy
    with session(config) as placement:
        config = resolve_world(config, placement.world_size)
        device = placement.device(spec.device)
        run = create_run(config, placement, echo=False)
        torch.manual_seed(spec.seed)
        watch = Stopwatch(device, spec.warmup)
        batches = [b.to(device) for b in make_batches(spec)]
        job = BenchJob(build_model(config, spec.vocab), PremadeBatches(batches, watch), watch)
        job.batches = partition(job.batches, config, run, placement)
        try:
            Trainer(config, job, run, device, placement).fit()
        finally:
            run.close()
        if placement.is_main:
            seconds = watch.seconds()
            tokens = spec.steps * spec.micro_batch * spec.seq_len
            Path(args.out).write_text(json.dumps({"seconds": seconds, "tokens": tokens}))


def launch(args: argparse.Namespace, strategy: str, nproc: int, root: Path) -> float:
    """Tokens/s of one variant, in fresh processes."""
    out = root / f"{strategy}-{nproc}.json"
    own = [
        "--worker", "--strategy", strategy, "--out", str(out), "--root", str(root),
        "--device", args.device, "--precision", args.precision, "--threads", str(args.threads),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len",
        str(args.seq_len), "--micro-batch", str(args.micro_batch), "--vocab", str(args.vocab),
    ]
    script = str(Path(__file__).resolve())
    if strategy == "single":
        command = [sys.executable, script, *own]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", script, *own]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{strategy} x {nproc} failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    return result["tokens"] / result["seconds"]


# ---------------------------------------------------------------------- driver


def variants(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.device == "cuda":
        found = [("single", 1), ("ddp", 1)]
        if args.nproc > 1:
            found += [("ddp", args.nproc), ("fsdp", args.nproc)]
        return found
    return [("single", 1), ("ddp", args.nproc), ("fsdp", args.nproc)]


def report(args: argparse.Namespace, results: dict[tuple[str, int], list[float]]) -> str:
    medians = {key: statistics.median(values) for key, values in results.items()}
    base = medians[("single", 1)]
    spec = spec_of(args, args.micro_batch)
    lines = [
        f"- command: `{args.command_line}`",
        f"- machine: {machine(spec)}",
        f"- date: {args.started:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"python {platform.python_version()}",
        f"- setting: device {args.device}, {args.precision}, seq_len {args.seq_len}, "
        f"micro-batch {args.micro_batch} per rank, vocab {args.vocab}, {args.threads} "
        f"thread(s) per process, {args.warmup} warmup + {args.steps} timed steps x "
        f"{args.repeats} rounds",
        f"- load average (1 min) before/after: {args.load_before:.2f} / {args.load_after:.2f}",
        "",
        "| variant | processes | tok/s per round | median tok/s | vs single | "
        "scaling efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for (strategy, nproc), values in results.items():
        ratio = medians[(strategy, nproc)] / base
        rounds = " / ".join(f"{v:,.0f}" for v in values)
        lines.append(
            f"| {strategy} | {nproc} | {rounds} | {medians[(strategy, nproc)]:,.0f} | "
            f"{ratio:.3f}x | {ratio / nproc:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the parallel variants")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per launch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8, help="windows per rank per step")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    # Internal: one rank of one variant.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.nproc, args.threads, args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--nproc, --threads, --steps, --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA GPU")
    args.command_line = "python " + shlex.join([sys.argv[0], *(argv or sys.argv[1:])])
    args.started = dt.datetime.now(dt.timezone.utc)
    args.load_before = os.getloadavg()[0]
    results: dict[tuple[str, int], list[float]] = {key: [] for key in variants(args)}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-dist-") as tmp:
        for rnd in range(args.repeats):
            order = list(results) if rnd % 2 == 0 else list(reversed(results))
            for strategy, nproc in order:
                tps = launch(args, strategy, nproc, Path(tmp))
                results[(strategy, nproc)].append(tps)
                print(f"round {rnd + 1}/{args.repeats} {strategy} x {nproc}: {tps:,.0f} tok/s",
                      file=sys.stderr, flush=True)
    args.load_after = os.getloadavg()[0]
    text = report(args, results)
    print(text)
    if args.json:
        payload = {
            "command": args.command_line,
            "date": args.started.isoformat(),
            "results": [
                {"strategy": s, "nproc": n, "tokens_per_sec": v} for (s, n), v in results.items()
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
