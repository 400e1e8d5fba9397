"""The `kiln` command: parse, call a workflow, print. User errors exit 2 without a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.workflows import TrainOutcome


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="Reproducible, resumable, memory-bounded training."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="start a new run (default: the packaged default config)")
    p.add_argument("--config", help="packaged config name or YAML file (default: default)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override one config value; repeatable",
    )

    p = sub.add_parser("resume", help="continue a run from its latest valid checkpoint")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("runs", help="table of runs under a folder")
    p.add_argument("root", type=Path, nargs="?", default=Path("experiments"))

    p = sub.add_parser("eval", help="validation loss and perplexity of a run's checkpoint")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")

    p = sub.add_parser("export", help="write or verify an immutable export bundle")
    p.add_argument("run_dir", type=Path, nargs="?")
    p.add_argument("--to", type=Path, help="new folder for the bundle")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--verify", type=Path, metavar="DIR", help="re-check a bundle's checksums")

    p = sub.add_parser("generate", help="continue a prompt with a trained run's model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")

    sub.add_parser("configs", help="list the packaged configs")
    return parser


def _run(args: argparse.Namespace) -> int:
    # Imported here so `kiln --help` stays fast and free of torch start-up.
    from kiln import workflows
    from kiln.config import load_config, packaged_config_names
    from kiln.run import list_runs

    if args.command in (None, "train"):
        config = load_config(getattr(args, "config", None), getattr(args, "overrides", []))
        return _report(workflows.train(config))
    elif args.command == "resume":
        return _report(workflows.resume(args.run_dir))
    elif args.command == "runs":
        _print_runs(list_runs(args.root))
    elif args.command == "eval":
        metrics = workflows.evaluate_run(args.run_dir, args.checkpoint)
        print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in metrics.items()))
    elif args.command == "export":
        _export(args, workflows)
    elif args.command == "generate":
        print(workflows.generate(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, which=args.checkpoint))
    elif args.command == "configs":
        print("\n".join(packaged_config_names()))
    return 0


def _export(args: argparse.Namespace, workflows: ModuleType) -> None:
    from kiln.export import verify_bundle

    if args.verify:
        names = verify_bundle(args.verify)
        print(f"OK: {len(names)} files verified in {args.verify}")
        return
    if args.run_dir is None or args.to is None:
        raise KilnError("use `kiln export RUN_DIR --to DIR` or `kiln export --verify DIR`")
    path = workflows.export_run(args.run_dir, args.to, args.checkpoint)
    print(f"exported to {path}")


def _report(outcome: TrainOutcome) -> int:
    """Print the end of a training command; exit 130 if a signal stopped it."""
    print(f"run directory: {outcome.run_dir}")
    print(f"status: {outcome.status} at step {outcome.step}")
    if outcome.status == "interrupted":
        print(f"continue with: kiln resume {outcome.run_dir}")
        return 130
    if outcome.val_ppl is not None:
        print(f"validation loss {outcome.val_loss:.4f}, perplexity {outcome.val_ppl:.2f}")
    if outcome.sample is not None:
        print("sample:\n" + outcome.sample)
    return 0


def _print_runs(rows: list[dict]) -> None:
    if not rows:
        print("no runs found")
        return
    headers = ["id", "job", "status", "step", "loss", "val_ppl"]

    def cell(value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [[cell(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    for line in [headers, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kiln` command."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KilnError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
