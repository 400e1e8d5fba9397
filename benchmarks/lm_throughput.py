"""Training-loop throughput: Kiln's ``Trainer.fit()`` against a hand-written PyTorch loop.

Both loops train the same GPT (``kiln.jobs.lm.build_model`` with the packaged default config's
model section, initialised from the same seed) on the same pre-made synthetic batches, with
the same optimizer, param groups, warmup+cosine schedule, gradient clipping and precision, in
one process, with the same thread count and determinism flags. The ratio of their tokens per
second is what Kiln's own per-step work costs (target: kiln/minimal >= 0.97).

What is timed
    Data loading is not: every batch (``[micro_batch, seq_len + 1]`` int64 token windows from a
    seeded generator) is made before either loop starts and already sits on the device.

    Kiln runs the real ``Trainer.fit()`` in a throw-away run directory, with periodic eval and
    checkpoints off and metrics logged every 10 steps (the default cadence), so everything the
    trainer does per step is inside the measurement: RNG capture, loader state, the loss split
    and weighting, scaler calls, clipping, scheduler, ``.item()`` syncs, metrics rows and log
    lines, and the LM job's per-token loss weighting (every weight 1 here, as in plain
    next-token training). The job handed to the trainer is a small in-memory implementation of the
    ``TrainableJob`` protocol, and it is also the stopwatch: the clock starts the first time
    the trainer touches the batch source (``state_dict`` or ``next_batch``) for the first
    step after warmup, and stops when the trainer calls ``job.evaluate()``. ``fit()`` calls
    evaluate once, right after its last step and before its final checkpoint save, so the
    window is exactly the timed steps, with no monkeypatching of Kiln. The minimal loop takes
    its marks at the same places (top of the first timed iteration, after the last one). On
    CUDA each mark synchronises the device first.

Noise control
    Both loops run ``--repeats`` times, interleaved; the order flips every round (kiln,
    minimal, then minimal, kiln, ...) so a steady drift in machine speed does not favour either
    one. Per-round and median tokens/s are reported, and the ratio of the medians. The loss of
    the last step of each loop is recorded too: the two loops compute the same loss (Kiln as a
    weighted sum over positions, the minimal loop as a plain mean), so they agree to float
    rounding, which checks that the same work was timed.

Run ``python benchmarks/lm_throughput.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import Config, load_config
from kiln.data.mixture import normalize_step
from kiln.engine.trainer import Trainer
from kiln.jobs.lm import build_model, weighted_token_loss, window_tokens
from kiln.repro import set_determinism
from kiln.run import Run, read_metrics

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Spec:
    """One benchmark setting, shared by both loops."""

    device: torch.device
    precision: str
    threads: int
    seq_len: int
    micro_batch: int
    vocab: int
    warmup: int
    steps: int
    log_every: int
    deterministic: bool
    seed: int

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def timed_tokens(self) -> int:
        return self.steps * self.micro_batch * self.seq_len


@dataclass
class Measurement:
    loop: str
    round: int
    seconds: float
    tokens_per_sec: float
    final_loss: float


@dataclass
class PrecisionResult:
    precision: str
    kiln: list[Measurement] = field(default_factory=list)
    minimal: list[Measurement] = field(default_factory=list)

    @property
    def kiln_median(self) -> float:
        return statistics.median(m.tokens_per_sec for m in self.kiln)

    @property
    def minimal_median(self) -> float:
        return statistics.median(m.tokens_per_sec for m in self.minimal)

    @property
    def ratio(self) -> float:
        return self.kiln_median / self.minimal_median

    def round_ratios(self) -> list[float]:
        pairs = zip(self.kiln, self.minimal, strict=True)
        return [k.tokens_per_sec / m.tokens_per_sec for k, m in pairs]


# ---------------------------------------------------------------------- timing and data


class Stopwatch:
    """Two wall-clock marks: start of the first timed step, end of the last one."""

    def __init__(self, device: torch.device, first_timed_step: int) -> None:
        self.device = device
        self.first_timed_step = first_timed_step
        self.start: float | None = None
        self.end: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step_begins(self, index: int) -> None:
        """Called at the start of step ``index`` (0-based); starts the clock once."""
        if self.start is None and index == self.first_timed_step:
            self.start = self._now()

    def stop(self) -> None:
        if self.end is None:
            self.end = self._now()

    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the timed window was never opened and closed; too few steps?")
        return self.end - self.start


class PremadeBatches:
    """A StepBatches that hands out batches made in advance, telling the stopwatch."""

    def __init__(self, batches: list[torch.Tensor], watch: Stopwatch) -> None:
        self._batches = batches
        self._watch = watch
        self._index = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        self._watch.step_begins(self._index)
        tokens = self._batches[self._index % len(self._batches)]
        self._index += 1
        # What the LM job's loader hands out for plain next-token training.
        targets = tokens[:, 1:]
        return normalize_step({
            "tokens": tokens,
            "weights": torch.ones(targets.shape, device=tokens.device),
            "components": torch.zeros_like(targets),
        })

    def state_dict(self) -> dict[str, Any]:
        # The trainer asks for the loader state first thing in each step.
        self._watch.step_begins(self._index)
        return {"index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._index = int(state["index"])

    def close(self) -> None:
        pass


class BenchJob:
    """The smallest TrainableJob: the LM loss on pre-made batches; evaluate stops the clock."""

    def __init__(self, model: nn.Module, batches: PremadeBatches, watch: Stopwatch) -> None:
        self.model = model
        self.batches = batches
        self._watch = watch

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return weighted_token_loss(model, batch)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return window_tokens(batch)

    def evaluate(self, model: nn.Module, *, final: bool) -> dict[str, float]:
        self._watch.stop()
        return {"val_loss": 0.0}


def make_batches(spec: Spec) -> list[torch.Tensor]:
    """One distinct random window batch per step, from a private seeded generator."""
    generator = torch.Generator().manual_seed(spec.seed)
    shape = (spec.total_steps, spec.micro_batch, spec.seq_len + 1)
    tokens = torch.randint(0, spec.vocab, shape, generator=generator, dtype=torch.int64)
    return list(tokens.to(spec.device).unbind(0))


def bench_config(spec: Spec, run_root: Path) -> Config:
    """The packaged default config, resized and with periodic eval and checkpoints off."""
    config = load_config(
        "default",
        [
            f"seed={spec.seed}",
            f"run.root={run_root}",
            f"data.seq_len={spec.seq_len}",
            f"data.tokenizer.vocab_size={spec.vocab}",
            f"training.max_steps={spec.total_steps}",
            f"training.micro_batch_size={spec.micro_batch}",
            "training.grad_accum_steps=1",
            f"precision.dtype={spec.precision}",
            f"hardware.device={spec.device.type}",
            f"hardware.threads={spec.threads}",
            f"hardware.deterministic={str(spec.deterministic).lower()}",
            "checkpoint.every_steps=0",
            "checkpoint.every_minutes=0",
            "eval.every_steps=0",
            f"logging.every_steps={spec.log_every}",
            "logging.progress=false",
        ],
    )
    # The minimal loop below implements exactly this much of the config; say so if it drifts.
    o, s = config.optimizer, config.schedule
    if o.name != "adamw" or o.l1 or o.l2 or s.name != "cosine":
        raise SystemExit("the minimal loop implements AdamW + cosine without l1/l2 only")
    return config


# ---------------------------------------------------------------------- the two loops


def run_kiln(spec: Spec, config: Config, batches: list[torch.Tensor], rnd: int) -> Measurement:
    """The real Trainer.fit() in a fresh run directory, deleted afterwards."""
    torch.manual_seed(spec.seed)
    model = build_model(config, spec.vocab)
    watch = Stopwatch(spec.device, spec.warmup)
    job = BenchJob(model, PremadeBatches(batches, watch), watch)
    run = Run.create(config, echo=False)
    try:
        Trainer(config, job, run, spec.device).fit()
        rows = [r for r in read_metrics(run.path) if "loss" in r]
    finally:
        run.close()
        shutil.rmtree(run.path, ignore_errors=True)
    seconds = watch.seconds()
    return Measurement("kiln", rnd, seconds, spec.timed_tokens / seconds, rows[-1]["loss"])


def run_minimal(spec: Spec, config: Config, batches: list[torch.Tensor], rnd: int) -> Measurement:
    """What a careful person writes by hand for the same model, optimizer and schedule."""
    torch.manual_seed(spec.seed)
    model = build_model(config, spec.vocab).to(spec.device)
    opt_cfg, sched_cfg = config.optimizer, config.schedule
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": opt_cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=opt_cfg.lr,
        betas=opt_cfg.betas,
        eps=opt_cfg.eps,
        fused=True,  # torch's one-pass kernel, as Kiln's build_optimizer picks on CPU and CUDA
    )
    warm, floor, total = sched_cfg.warmup_steps, sched_cfg.min_lr_ratio, spec.total_steps

    def lr_scale(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scale)
    clip = config.training.grad_clip or math.inf
    use_bf16 = spec.precision == "bf16"
    watch = Stopwatch(spec.device, spec.warmup)
    model.train()
    loss_value = math.nan
    for index in range(total):
        watch.step_begins(index)
        batch = batches[index]
        with torch.autocast(spec.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss_value = loss.item()
    watch.stop()
    seconds = watch.seconds()
    return Measurement("minimal", rnd, seconds, spec.timed_tokens / seconds, loss_value)


# ---------------------------------------------------------------------- driver and report


def benchmark_precision(spec: Spec, repeats: int, run_root: Path) -> PrecisionResult:
    config = bench_config(spec, run_root)
    batches = make_batches(spec)
    result = PrecisionResult(spec.precision)
    loops = {"kiln": run_kiln, "minimal": run_minimal}
    for rnd in range(repeats):
        order = ["kiln", "minimal"] if rnd % 2 == 0 else ["minimal", "kiln"]
        for name in order:
            gc.collect()
            if spec.device.type == "cuda":
                torch.cuda.empty_cache()
            m = loops[name](spec, config, batches, rnd)
            getattr(result, name).append(m)
            print(
                f"[{spec.precision}] round {rnd + 1}/{repeats} {name:7s} "
                f"{m.tokens_per_sec:10,.0f} tok/s ({m.seconds:.2f}s for {spec.steps} steps, "
                f"final loss {m.final_loss:.6f})",
                file=sys.stderr,
                flush=True,
            )
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(spec: Spec) -> str:
    text = f"{platform.platform()}, {cpu_model()} ({os.cpu_count()} logical CPUs)"
    text += f", torch threads {spec.threads}"
    if spec.device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(spec.device)}"
    return text


def report(args: argparse.Namespace, spec: Spec, results: list[PrecisionResult]) -> str:
    def per_round(values: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in values)

    lines = [
        f"- command: `{args.command_line}`",
        f"- machine: {machine(spec)}",
        f"- date: {args.started:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"python {platform.python_version()}",
        f"- setting: device {spec.device.type}, seq_len {spec.seq_len}, micro-batch "
        f"{spec.micro_batch}, vocab {spec.vocab}, {spec.warmup} warmup + {spec.steps} timed "
        f"steps x {args.repeats} rounds, deterministic={spec.deterministic}, metrics every "
        f"{spec.log_every} steps",
        f"- load average (1 min) before/after: {args.load_before:.2f} / {args.load_after:.2f}",
        "",
        "| precision | kiln tok/s per round | minimal tok/s per round | per-round ratio "
        "| kiln median | minimal median | kiln/minimal (medians) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.precision} | {per_round([m.tokens_per_sec for m in r.kiln], ',.0f')} "
            f"| {per_round([m.tokens_per_sec for m in r.minimal], ',.0f')} "
            f"| {per_round(r.round_ratios(), '.3f')} "
            f"| {r.kiln_median:,.0f} | {r.minimal_median:,.0f} | **{r.ratio:.3f}x** |"
        )
    for r in results:
        k, m = r.kiln[-1].final_loss, r.minimal[-1].final_loss
        verdict = "match" if math.isclose(k, m, rel_tol=1e-3) else "DIFFER: not the same work?"
        lines.append(f"\n{r.precision}: last-step loss kiln {k:.6f}, minimal {m:.6f} ({verdict})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokens/s of Kiln's Trainer.fit() vs a minimal PyTorch loop (same work)."
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--precision", default="fp32,bf16", help="comma-separated: fp32,bf16 (default: both)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--log-every", type=int, default=10, help="Kiln metrics cadence")
    parser.add_argument(
        "--no-deterministic",
        dest="deterministic",
        action="store_false",
        help="turn off deterministic kernels for both loops (Kiln's default is on)",
    )
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown or not precisions:
        parser.error(f"--precision takes a comma-separated subset of {','.join(PRECISIONS)}")
    args.precisions = precisions
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps, --repeats and --threads must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.command_line = "python " + shlex.join([sys.argv[0], *(argv or sys.argv[1:])])
    args.started = dt.datetime.now(dt.timezone.utc)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA GPU")
    # Process-wide, so both loops run under identical settings. Determinism first: it must
    # precede any CUDA work.
    set_determinism(args.deterministic)
    torch.set_num_threads(args.threads)
    args.load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        for precision in args.precisions:
            spec = Spec(
                device=device,
                precision=precision,
                threads=args.threads,
                seq_len=args.seq_len,
                micro_batch=args.micro_batch,
                vocab=args.vocab,
                warmup=args.warmup,
                steps=args.steps,
                log_every=args.log_every,
                deterministic=args.deterministic,
                seed=args.seed,
            )
            results.append(benchmark_precision(spec, args.repeats, Path(tmp)))
    args.load_after = os.getloadavg()[0]
    print(report(args, spec, results))
    if args.json:
        payload = {
            "command": args.command_line,
            "machine": machine(spec),
            "date": args.started.isoformat(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_before_after": [args.load_before, args.load_after],
            "setting": {k: v for k, v in asdict(spec).items() if k not in ("device", "precision")}
            | {"device": device.type, "repeats": args.repeats},
            "results": [
                {
                    "precision": r.precision,
                    "kiln_tokens_per_sec_median": r.kiln_median,
                    "minimal_tokens_per_sec_median": r.minimal_median,
                    "ratio_kiln_over_minimal": r.ratio,
                    "per_round_ratios": r.round_ratios(),
                    "runs": [asdict(m) for m in r.kiln + r.minimal],
                }
                for r in results
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
