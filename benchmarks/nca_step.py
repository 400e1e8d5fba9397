"""What one Growing-NCA training step costs, by grid size, precision and activation checkpointing.

What is timed
    One training step's work for a batch of 8: a rollout of ``--rollout`` automaton steps
    (default 80, the middle of the recipe's 64-96) from seed-grown states with pre-drawn fire
    masks, the RGBA L2 loss, and backward through the whole rollout (no optimizer: it is
    negligible next to the rollout for 8,336 parameters). Median of ``--repeats`` after one
    warm-up, in seconds per step and cell updates per second.

Memory
    Each configuration runs in its own subprocess; peak RSS (ru_maxrss) minus the RSS before
    the first step is what the rollout and backward added (activations, gradients).

    .venv/bin/python benchmarks/nca_step.py                       # grids 72,40,28,20
    .venv/bin/python benchmarks/nca_step.py --grids 72 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from kiln.models.nca import NCA, NCAShape


def worker(grid: int, dtype: str, checkpointing: bool, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = NCA(NCAShape(checkpoint=checkpointing))
    with torch.no_grad():
        model.out.weight.normal_(0.0, 0.02)  # a trained-like update, not the zero start
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start = model(model.seed_state(8, grid, grid), 40, generator=g)  # a grown state
    fire = torch.rand((8, args.rollout, grid, grid), generator=g) < 0.5
    target = torch.rand(4, grid, grid)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(start, args.rollout, fire=fire)
            loss = (out[:, :4].float() - target).pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "grid": grid,
        "precision": dtype,
        "checkpointing": checkpointing,
        "s_per_step": seconds,
        "cell_updates_per_s": 8 * args.rollout * grid * grid / seconds,
        "added_peak_mib": (peak - rss_before) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default="72,40,28,20", help="grid sides (cells)")
    parser.add_argument("--rollout", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        grid, dtype, ckpt = json.loads(args.worker)
        print(json.dumps(worker(grid, dtype, ckpt, args)))
        return 0
    print("| grid | precision | act. checkpointing | s/step | cell updates/s | added peak RSS |")
    print("| --- | --- | --- | --- | --- | --- |")
    for grid in (int(g) for g in args.grids.split(",")):
        for dtype, ckpt in (("fp32", False), ("bf16", False), ("fp32", True)):
            cmd = [sys.executable, __file__, "--worker", json.dumps([grid, dtype, ckpt]),
                   "--rollout", str(args.rollout), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                          check=True).stdout)
            print(f"| {grid}x{grid} | {dtype} | {'on' if ckpt else 'off'} | "
                  f"{r['s_per_step']:.3f} | {r['cell_updates_per_s']:,.0f} | "
                  f"{r['added_peak_mib']:.0f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
