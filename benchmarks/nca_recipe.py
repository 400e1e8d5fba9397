"""The Growing NCA recipe on the packaged target: does the loss fall 100x, does the pattern last?

What runs
    ``kiln train --config nca`` (the paper's recipe: 16 channels, identity + Sobel perception,
    8,336-parameter update network with a zero-initialised last layer, fire rate 0.5, alive
    masking, pool 1024, batch 8, rollouts of 64-96 steps, per-tensor gradient normalisation,
    Adam 2e-3 x0.1 after the first quarter of the steps) through the real trainer, with only the
    overrides given here: by default a CPU-sized run (20-cell target, padding 8, 3,000 steps,
    lr drop at step 750) instead of the paper's 40-cell target, padding 16 and 8,000 steps.

What is measured
    - the loss of the seed state (what training starts from: the zero-initialised automaton
      leaves the seed as it is) against the mean training loss of the last 100 steps, and the
      ratio of the two (the criterion: at least 100);
    - persistence: the trained automaton grows ``--samples`` patterns from the seed with a
      fixed generator, and the loss to the target is read after 1, 2, 4 and 8 times the longest
      training rollout. The pattern "persists" when the loss at twice the rollout length is at
      most twice the loss at the rollout length and still at least 10x below the seed's loss;
    - the growth strip (steps 0 .. 8x the rollout length) and the GIF, saved in the run's
      ``render/`` folder, and ``nca_recipe.json`` with every number, in the run directory.

    .venv/bin/python benchmarks/nca_recipe.py                        # the CPU-sized run
    .venv/bin/python benchmarks/nca_recipe.py --steps 8000 --milestone 2000 --target-size 40 \\
        --padding 16                                                # the paper's sizes
    .venv/bin/python benchmarks/nca_recipe.py --pool-size 0          # no pool: the contrast
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import torch

from kiln import workflows
from kiln.config import load_config
from kiln.jobs.nca import EVAL_STREAM, build_model, grid_target, render_model
from kiln.jobs.nca_pool import sample_losses
from kiln.models.nca import grow
from kiln.run import read_metrics

MULTIPLES = (1, 2, 4, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--milestone", type=int, default=750, help="step of the x0.1 lr drop")
    parser.add_argument("--target-size", type=int, default=20)
    parser.add_argument("--padding", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=1024)
    parser.add_argument("--damage", type=int, default=0)
    parser.add_argument("--samples", type=int, default=8, help="patterns grown for persistence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="experiments/benchmarks", help="run root folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override (key.path=value); repeatable")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    overrides = [
        f"training.max_steps={args.steps}",
        f"schedule.milestones=[{args.milestone}]",
        f"nca.target_size={args.target_size}",
        f"nca.padding={args.padding}",
        f"nca.pool_size={args.pool_size}",
        f"nca.damage={args.damage}",
        f"hardware.threads={args.threads}",
        "hardware.device=cpu",
        f"run.root={args.root}",
        "run.name=nca_recipe",
        "logging.every_steps=1",
        "logging.progress=false",
        *args.overrides,
    ]
    config = load_config("nca", overrides)
    started = time.monotonic()
    outcome = workflows.train(config)
    train_seconds = time.monotonic() - started
    run_dir = outcome.run_dir
    if outcome.status != "completed":
        print(f"training {outcome.status} at step {outcome.step}; no report", file=sys.stderr)
        return 1

    rows = [r for r in read_metrics(run_dir) if "loss" in r and r.get("event") is None]
    target = grid_target(config.nca)
    _, h, w = target.shape
    model = build_model(config)
    _, state = workflows.load_chosen_checkpoint(run_dir, "latest")
    model.load_state_dict(state["model"])
    model.eval()
    seed = model.seed_state(args.samples, h, w)
    seed_loss = sample_losses(seed, target).mean().item()
    final_loss = statistics.fmean(r["loss"] for r in rows[-100:])

    horizon = config.nca.rollout_max
    record = [m * horizon for m in MULTIPLES]
    generator = torch.Generator().manual_seed(config.seed + EVAL_STREAM)
    with torch.no_grad():
        grown = grow(model, seed, record, generator)
    persist = {step: sample_losses(grown[step], target).mean().item() for step in record}
    at_1x, at_2x = persist[horizon], persist[2 * horizon]
    persists = at_2x <= 2 * at_1x and at_2x <= seed_loss / 10

    config.nca.render_steps = [0, 16, 32, 64, horizon, 2 * horizon, 4 * horizon, 8 * horizon]
    png, gif = render_model(config, model, run_dir / "render", "persistence")

    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "command": "benchmarks/nca_recipe.py " + " ".join(sys.argv[1:]),
        "overrides": overrides,
        "run_dir": str(run_dir),
        "grid": [h, w],
        "parameters": model.num_parameters(),
        "steps": outcome.step,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(1, outcome.step), 3),
        "seed_loss": seed_loss,
        "final_train_loss_last100": final_loss,
        "loss_ratio": seed_loss / final_loss,
        "loss_falls_100x": seed_loss / final_loss >= 100,
        "persistence_loss": {str(k): v for k, v in persist.items()},
        "persists_2x": persists,
        "final_eval": outcome.final_eval,
        "images": [str(png), str(gif), str(run_dir / "render" / "growth.png")],
    }
    (run_dir / "nca_recipe.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(
        "\n| grid | steps | s/step | seed loss | final loss (last 100) | ratio | "
        + " | ".join(f"loss at {s}" for s in record)
        + " | persists 2x |"
    )
    print("| --- " * (7 + len(record)) + "|")
    print(
        f"| {h}x{w} | {outcome.step} | {report['seconds_per_step']} | {seed_loss:.4g} | "
        f"{final_loss:.3g} | {report['loss_ratio']:.0f}x | "
        + " | ".join(f"{persist[s]:.3g}" for s in record)
        + f" | {'yes' if persists else 'no'} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
