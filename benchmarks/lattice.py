"""The batched 3D lattice against a per-cell Python loop, on a small and the full 11x15x15 grid.

What is compared
    ``kiln.models.lattice.Lattice`` (all cells advance in a few batched matmuls) and the per-cell
    reference in ``tests/models/lattice_reference.py`` (a Python loop over cells, one small gMLP
    call per cell, as the original project did, but reading cells through views so that its
    backward stays linear in the number of cells), on the same weights and inputs; both compute
    the same numbers (the tests check it to float tolerance).

What is timed
    One training step's worth of work per propagation step: forward through ``steps`` propagation
    steps, then backward of ``mean(output^2) + mean(state^2)`` (the state term makes every cell
    part of the backward, as in training with internal losses). Reported per propagation step
    (total / steps), median over ``--repeats`` after ``--warmups`` untimed runs (default 2: with
    glibc tuned, the heap takes a few runs to hold every temporary). The full-size reference is
    slow, so it runs ``--ref-steps`` propagation steps (default 1) and fewer repeats; its cost is
    linear in the number of steps (every step does the same per-cell work), so the per-step time
    extrapolates directly.

Memory
    Every configuration runs in its own subprocess: peak RSS (``resource.getrusage`` ru_maxrss)
    minus the RSS just before the first forward (model, optimizer-free, inputs already built)
    is what the forward/backward added: activations, gradients, allocator slack. On CUDA the
    numbers are ``torch.cuda.max_memory_allocated`` instead.

Training through the engine (``--train-grids``, default "small,full")
    The lattice job trained by Kiln's one training loop (``kiln.workflows.train``: pool batches,
    forward through all propagation steps, the three losses, backward, clip, AdamW step, pool
    write-back, a checkpoint at the end), ``--train-steps`` optimizer steps of ``--train-batch``
    samples. Steps/s is the median over the steps after the first (warm-up), from the per-step
    throughput the trainer logs; peak memory is the worker's peak RSS (or peak CUDA allocation);
    optimizer state is the bytes of every tensor in the checkpoint's optimizer state. Variants:
    the packaged ``lattice`` config (fp32, glibc told to keep freed memory), the same with glibc's
    default allocator, bf16 autocast, activation checkpointing per propagation step,
    channels-first pool storage (``lattice.channels_last_3d: false``) and 8-bit AdamW (when
    bitsandbytes is installed). The teacher is the hashed encoder at 384 dimensions (the size
    of MiniLM's vectors, so the adapter is the same) so that no extra is needed. On a GPU the
    table also gives the time of one epoch over the default dialogue set (its training pairs /
    batch steps).

Options: ``--threads`` (default 2), ``--ref-threads`` (the reference's; default the same),
``--warmups``, ``--batch`` (default "1,8"), ``--grids`` (small, full),
``--repeats``, ``--device``, ``--malloc-tuned`` (also run with glibc told to keep freed memory,
``kiln.engine.allocator``, which removes the page-fault cost of large temporaries),
``--train-grids``, ``--train-steps``,
``--train-batch``, ``--split`` (profile the tuned batched step once more and give the share
of matrix products against everything else), ``--optimizers`` (time one AdamW and one 8-bit
AdamW step alone on the full lattice's parameters), ``--json FILE``. An empty ``--grids`` or
``--train-grids`` skips that part. See ``--help``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kiln.engine.allocator import keep_freed_memory
from kiln.models.lattice import Lattice, LatticeShape

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {"small": (5, 6, 6), "full": (11, 15, 15)}
TEACHER_DIM = 384  # all-MiniLM-L6-v2's embedding size


def load_reference() -> Any:
    path = ROOT / "tests" / "models" / "lattice_reference.py"
    spec = importlib.util.spec_from_file_location("lattice_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process and return its measurements."""
    torch.set_num_threads(spec["threads"])
    if spec.get("keep_memory"):
        keep_freed_memory()
    device = torch.device(spec["device"])
    d, h, w = GRIDS[spec["grid"]]
    steps = spec["steps"]
    shape = LatticeShape(
        depth=d, height=h, width=w, input_dim=h * w, output_dim=h * w, steps=steps,
        sharing=spec["sharing"], checkpoint=spec["checkpoint"],
    )
    torch.manual_seed(0)
    model = Lattice(shape).to(device)
    x = torch.randn(spec["batch"], h * w, device=device)
    ref = load_reference() if spec["impl"] == "reference" else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])

    def run() -> float:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            if ref is None:
                out, state = model(x)
            else:
                out, state = ref.forward(model, x)
            loss = out.float().square().mean() + state.float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    base = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(spec["warmups"]):  # the first runs also grow the heap (with malloc tuning)
        run()
    times = [run() for _ in range(spec["repeats"])]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    split = profile_split(run, steps) if spec.get("profile") else {}
    per_step = statistics.median(times) / steps
    return {
        **spec,
        "per_step_s": per_step,
        "steps_per_s": 1.0 / per_step,
        "all_times_s": times,
        "peak_bytes": peak,
        "added_bytes": peak - base,
        "parameters": model.num_parameters(),
        **split,
    }


MATMULS = {"aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm"}


def profile_split(run: Any, steps: int) -> dict[str, float]:
    """One more run under torch.profiler: seconds per propagation step spent in matrix products
    and in everything else (elementwise passes, reductions, copies), by the ops' own time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    own = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}
    matmul = sum(t for key, t in own.items() if key in MATMULS)
    other = sum(t for key, t in own.items() if key.startswith("aten::") and key not in MATMULS)
    return {"matmul_s": matmul, "other_s": other}


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested structure (bitsandbytes nests its quantised state)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the lattice job through the engine in this process; steps/s, memory, state sizes."""
    from kiln import workflows
    from kiln.checkpoint import list_checkpoints, load_checkpoint
    from kiln.config import load_config
    from kiln.data.dialogue import load_dialogue_pairs, split_pairs
    from kiln.run import read_metrics
    from kiln.streaming.location import store_root
    from kiln.streaming.store import MANIFEST

    d, h, w = GRIDS[spec["grid"]]
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"run.root={tmp}/runs", f"lattice.cache_dir={tmp}/cache",
            f"lattice.depth={d}", f"lattice.height={h}", f"lattice.width={w}",
            "lattice.encoder=hashed", f"lattice.encoder_dim={TEACHER_DIM}",
            "lattice.eval_pairs=8", f"training.max_steps={spec['steps']}",
            f"training.micro_batch_size={spec['batch']}", "checkpoint.every_steps=0",
            "eval.every_steps=0", "logging.every_steps=1", "logging.progress=false",
            f"hardware.device={spec['device']}", f"hardware.threads={spec['threads']}",
            *spec["overrides"],
        ]
        config = load_config("lattice", overrides)
        if spec["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        outcome = workflows.train(config, echo=False)
        rows = [r for r in read_metrics(outcome.run_dir) if "loss" in r]
        per_step = statistics.median(spec["batch"] / r["tokens_per_sec"] for r in rows[1:])
        if config.strategy.name == "streaming":  # the optimizer state is in the chunk store
            manifest = json.loads((store_root(config, outcome.run_dir) / MANIFEST).read_text())
            optimizer_bytes = sum(c["parts"]["s"]["nbytes"] for c in manifest["chunks"]
                                  if c["parts"]["s"] is not None)
        else:
            state, _ = load_checkpoint(list_checkpoints(outcome.run_dir / "checkpoints")[-1].path)
            optimizer_bytes = tensor_bytes(state["optimizer"]["state"])
        train, _ = split_pairs(
            load_dialogue_pairs(config.lattice.dialogue_path), config.lattice.val_fraction,
            config.seed,
        )
    peak = torch.cuda.max_memory_allocated() if spec["device"] == "cuda" else peak_rss_bytes()
    return {
        **spec,
        "per_step_s": per_step,
        "steps_per_s": 1.0 / per_step,
        "step_times_s": [spec["batch"] / r["tokens_per_sec"] for r in rows],
        "final_loss": rows[-1]["loss"],
        "peak_bytes": peak,
        "optimizer_state_bytes": optimizer_bytes,
        "epoch_s": per_step * (len(train) // spec["batch"]),
        "stream_bytes_per_step": statistics.median(
            r.get("stream_bytes_read", 0) + r.get("stream_bytes_written", 0) for r in rows[1:]
        ),
    }


def optimizer_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One optimizer's step time and state size on the full lattice's parameters."""
    from kiln.config import OptimizerSection
    from kiln.engine.optim import build_optimizer

    torch.set_num_threads(spec["threads"])
    d, h, w = GRIDS["full"]
    torch.manual_seed(0)
    model = Lattice(LatticeShape(depth=d, height=h, width=w, input_dim=h * w, output_dim=h * w))
    optimizer = build_optimizer(model, OptimizerSection(name=spec["optimizer"]))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for _ in range(spec["repeats"] + 1):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {**spec, "step_s": statistics.median(times[1:]),
            "optimizer_state_bytes": tensor_bytes(optimizer.state_dict()["state"])}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grids", default="small,full", help="comma list of: small (5x6x6), full")
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    p.add_argument("--steps", type=int, default=4, help="propagation steps timed (batched)")
    p.add_argument("--ref-steps", type=int, default=1, help="propagation steps (reference)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-repeats", type=int, default=2, help="repeats of the full-size reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ref-threads", type=int, default=None,
                   help="threads of the per-cell reference (default --threads); its many tiny "
                        "ops run fastest on 1")
    p.add_argument("--warmups", type=int, default=2, help="untimed runs before the repeats")
    p.add_argument("--device", default="cpu")
    p.add_argument("--malloc-tuned", action="store_true", help="also run with glibc tuning")
    p.add_argument("--train-grids", default="small,full", help="grids trained by the engine")
    p.add_argument("--train-steps", type=int, default=4, help="optimizer steps per variant")
    p.add_argument("--train-batch", type=int, default=8, help="samples per optimizer step")
    p.add_argument("--train-variants", default="",
                   help="only the training variants whose names are in this '/'-separated list")
    p.add_argument("--split", action="store_true",
                   help="also profile the tuned batched step: matrix products against the rest")
    p.add_argument("--optimizers", action="store_true",
                   help="also time AdamW and 8-bit AdamW steps alone on the full lattice")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        kind = spec.get("kind", "compare")
        run = {"compare": worker, "train": train_worker, "optimizer": optimizer_worker}[kind]
        print(json.dumps(run(spec)))
        return

    base = {
        "threads": args.threads, "device": args.device, "sharing": "none", "checkpoint": False,
        "bf16": False, "impl": "batched", "repeats": args.repeats, "steps": args.steps,
        "warmups": args.warmups,
    }
    ref_threads = args.ref_threads or args.threads
    specs: list[tuple[str, dict[str, Any]]] = []
    for grid in filter(None, args.grids.split(",")):
        for batch in (int(b) for b in args.batch.split(",")):
            cfg = {**base, "grid": grid, "batch": batch}
            ref_repeats = args.ref_repeats if grid == "full" else args.repeats
            specs += [
                ("reference fp32", {**cfg, "impl": "reference", "steps": args.ref_steps,
                                    "repeats": ref_repeats, "threads": ref_threads}),
                ("batched fp32", cfg),
                ("batched bf16", {**cfg, "bf16": True}),
                ("batched fp32 checkpoint", {**cfg, "checkpoint": True}),
                ("batched fp32 per_depth", {**cfg, "sharing": "per_depth"}),
                ("batched fp32 all (3D NCA)", {**cfg, "sharing": "all"}),
            ]
            if args.malloc_tuned:
                specs += [
                    ("batched fp32, malloc tuned", {**cfg, "keep_memory": True}),
                    ("batched bf16, malloc tuned", {**cfg, "bf16": True, "keep_memory": True}),
                ]

    print(f"# lattice benchmark, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {args.threads} (reference {ref_threads}), device {args.device}")
    print(f"load average before: {load_average()}\n")
    results = compare(specs)
    results += split_step(args, base)
    results += train_variants(args)
    results += optimizer_steps(args)
    print(f"\nload average after: {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def compare(specs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Batched against the per-cell reference, forward + backward per propagation step."""
    if not specs:
        return []
    print("| grid | batch | variant | ms / step (fwd+bwd) | steps/s | x vs reference "
          "| peak MiB | added MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    results, ref_time = [], {}
    for name, spec in specs:
        r = run_worker(spec)
        r["variant"] = name
        results.append(r)
        key = (r["grid"], r["batch"])
        if r["impl"] == "reference":
            ref_time[key] = r["per_step_s"]
        r["speedup"] = ref_time[key] / r["per_step_s"]
        d, h, w = GRIDS[r["grid"]]
        print(f"| {d}x{h}x{w} | {r['batch']} | {name} | {1e3 * r['per_step_s']:,.1f} | "
              f"{r['steps_per_s']:.2f} | {r['speedup']:.1f} | "
              f"{mib(r['peak_bytes'])} | {mib(r['added_bytes'])} |", flush=True)
    return results


def split_step(args: argparse.Namespace, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Where the tuned batched step's time goes: matrix products against everything else."""
    if not args.split:
        return []
    print("\n| grid | batch | precision | ms / step | matrix products | everything else |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = []
    for grid in filter(None, args.grids.split(",")):
        for batch in (int(b) for b in args.batch.split(",")):
            for bf16 in (False, True):
                r = run_worker({**base, "grid": grid, "batch": batch, "bf16": bf16,
                                "keep_memory": True, "profile": True})
                results.append(r)
                d, h, w = GRIDS[grid]
                # The profiled run is slower than the timed ones: shares, not absolute times.
                total = r["matmul_s"] + r["other_s"]
                print(f"| {d}x{h}x{w} | {batch} | {'bf16' if bf16 else 'fp32'} | "
                      f"{1e3 * r['per_step_s']:,.0f} | {100 * r['matmul_s'] / total:.0f}% | "
                      f"{100 * r['other_s'] / total:.0f}% |", flush=True)
    return results


def optimizer_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    """AdamW against 8-bit AdamW alone, on the full lattice's 61.9M parameters."""
    if not args.optimizers:
        return []
    names = ["adamw", *(["adamw8bit"] if has_bitsandbytes() else [])]
    print("\nOptimizer step alone, full lattice parameters (61.9M)\n")
    print("| optimizer | s / step | state MiB |")
    print("| --- | --- | --- |")
    results = []
    for name in names:
        r = run_worker({"kind": "optimizer", "optimizer": name, "threads": args.threads,
                        "repeats": 3})
        results.append(r)
        print(f"| {name} | {r['step_s']:.3f} | {mib(r['optimizer_state_bytes'])} |", flush=True)
    return results


def train_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The lattice job through the engine: steps/s, peak memory, optimizer state, per variant."""
    grids = list(filter(None, args.train_grids.split(",")))
    if not grids:
        return []
    # The packaged config keeps freed memory (kiln.engine.allocator); one row turns it off.
    variants: list[tuple[str, list[str]]] = [
        ("fp32", []),
        ("fp32, glibc's default allocator", ["hardware.keep_freed_memory=false"]),
        ("bf16", ["precision.dtype=bf16"]),
        ("fp32, activation checkpointing", ["lattice.activation_checkpointing=true"]),
        ("fp32, channels-first pool", ["lattice.channels_last_3d=false"]),
        # Out of core, one depth slice of one propagation step per chunk, under a budget below
        # the weights and AdamW state (the store on the machine's disk, direct I/O).
        ("fp32, streamed, 512 MiB budget", ["strategy.name=streaming",
                                            "strategy.memory_budget=512MiB",
                                            "hardware.keep_freed_memory=false"]),
    ]
    if has_bitsandbytes():
        variants += [
            ("fp32, 8-bit AdamW", ["optimizer.name=adamw8bit"]),
            ("bf16, 8-bit AdamW", ["precision.dtype=bf16", "optimizer.name=adamw8bit"]),
        ]
    else:
        print("\n(bitsandbytes is not installed: no 8-bit AdamW rows)")
    if args.train_variants:
        chosen = args.train_variants.split("/")
        variants = [(name, overrides) for name, overrides in variants if name in chosen]
    gpu = args.device == "cuda"
    print(f"\nTraining through the engine: {args.train_steps} steps of {args.train_batch} "
          "samples, median step after the first\n")
    print("| grid | variant | s / step | steps/s | samples/s | peak MiB | optimizer state MiB |"
          + (" s / epoch |" if gpu else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if gpu else ""))
    results = []
    for grid in grids:
        for name, overrides in variants:
            spec = {"kind": "train", "grid": grid, "batch": args.train_batch, "variant": name,
                    "steps": args.train_steps, "threads": args.threads, "device": args.device,
                    "overrides": overrides}
            r = run_worker(spec)
            results.append(r)
            d, h, w = GRIDS[grid]
            print(f"| {d}x{h}x{w} | {name} | {r['per_step_s']:,.3f} | {r['steps_per_s']:.3f} | "
                  f"{args.train_batch * r['steps_per_s']:.2f} | {mib(r['peak_bytes'])} | "
                  f"{mib(r['optimizer_state_bytes'])} |"
                  + (f" {r['epoch_s']:.1f} |" if gpu else ""), flush=True)
            if r["stream_bytes_per_step"]:
                print(f"|  | (moved {mib(r['stream_bytes_per_step'])} MiB to and from the disk "
                      "per step) |  |  |  |  |  |" + ("  |" if gpu else ""), flush=True)
    return results


if __name__ == "__main__":
    main()
