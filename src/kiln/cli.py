"""The `kiln` command: parse, call a workflow, print. User errors (KilnError, a refused file
operation) exit 2 without a traceback."""

from __future__ import annotations

import argparse
import errno
import faulthandler
import math
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from kiln.errors import KilnError, RunError

if TYPE_CHECKING:
    from kiln.hashtron.multitask import TaskReport
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
    _nproc_option(p)

    p = sub.add_parser("resume", help="continue a run from its latest valid checkpoint")
    p.add_argument("run_dir", type=Path)
    _nproc_option(p)

    p = sub.add_parser("runs", help="table of runs under a folder")
    p.add_argument("root", type=Path, nargs="?", help="folder of runs (default: experiments)")

    p = sub.add_parser("eval", help="evaluate a run's checkpoint: perplexity, compile, pass@k")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    p.add_argument(
        "--suite", type=_suites, metavar="ppl,compile,passk",
        help="comma-separated suites (default: the run's eval.suites)",
    )
    p.add_argument(
        "--allow-code-execution", action="store_true",
        help="opt in to running generated code (passk); see README before using it",
    )

    p = sub.add_parser("export", help="write or verify an immutable export bundle")
    p.add_argument("run_dir", type=Path, nargs="?")
    p.add_argument("--to", type=Path, help="new folder for the bundle")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--verify", type=Path, metavar="DIR", help="re-check a bundle's checksums")

    p = sub.add_parser("generate", help="continue a prompt or fill in a middle with a run's model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--fim-prefix", help="code before the gap to fill (with --fim-suffix)")
    p.add_argument("--fim-suffix", help="code after the gap to fill (with --fim-prefix)")
    p.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                   help="tokens to generate, >= 1 (default: the run's sample section)")
    p.add_argument("--temperature", type=_temperature, metavar="T",
                   help="sampling temperature >= 0, 0 is greedy (default: as --max-new-tokens)")
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")

    p = sub.add_parser("render", help="draw an nca run's growth: a PNG strip and a GIF")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")

    p = sub.add_parser(
        "hashtron-tasks", help="train several hashtron tasks in a row and report each"
    )
    p.add_argument(
        "--tasks", type=_names, metavar="A,B,...",
        help="comma-separated task names (default: every offline task)",
    )
    p.add_argument("--config", default="hashtron",
                   help="config whose hashtron section and seed are used (default: hashtron)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override one config value; repeatable",
    )

    sub.add_parser("configs", help="list the packaged configs")
    return parser


def _nproc_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc", type=int, metavar="N",
        help="start N processes on this machine with torchrun (strategy ddp or fsdp)",
    )


def _run(args: argparse.Namespace) -> int:
    # Imported here so `kiln --help` stays fast and free of torch start-up.
    from kiln import workflows
    from kiln.config import load_config, packaged_config_names

    if args.command in (None, "train", "resume"):
        # Until the training loop installs its own handler (corpus scan, tokenizer, shards can
        # take minutes), SIGTERM stops a run as Ctrl-C does: marked interrupted, exit 130,
        # instead of dying with its status left at 'running'.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.command in (None, "train"):
        config = load_config(getattr(args, "config", None), getattr(args, "overrides", []))
        return _report(workflows.train(config))
    elif args.command == "resume":
        return _report(workflows.resume(args.run_dir))
    elif args.command == "runs":
        _runs(args.root)
    elif args.command == "eval":
        results = workflows.evaluate_run(
            args.run_dir, args.checkpoint, args.suite,
            allow_code_execution=args.allow_code_execution,
        )
        print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in results.items() if isinstance(v, int | float | str)))
        step = results["step"]
        print(f"details: {args.run_dir / 'eval' / f'{step:08d}.json'}")
    elif args.command == "export":
        _export(args, workflows)
    elif args.command == "generate":
        _generate(args, workflows)
    elif args.command == "render":
        png, gif = workflows.render_run(args.run_dir, args.checkpoint)
        print(f"growth strip: {png}\nanimation: {gif}")
    elif args.command == "hashtron-tasks":
        reports = workflows.hashtron_tasks(load_config(args.config, args.overrides), args.tasks)
        return _report_tasks(reports)
    elif args.command == "configs":
        print("\n".join(packaged_config_names()))
    return 0


def _report_tasks(reports: list[TaskReport]) -> int:
    """Print the task table; exit 2 (with the failed tasks on stderr) if any task failed."""
    from kiln.hashtron.multitask import format_reports

    print(format_reports(reports))
    failed = [r for r in reports if not r.ok]
    for report in failed:
        print(f"error: task {report.task} failed: {report.error}", file=sys.stderr)
    return 2 if failed else 0


def _export(args: argparse.Namespace, workflows: ModuleType) -> None:
    from kiln.export import verify_bundle

    if args.verify:
        if args.run_dir is not None or args.to is not None:
            raise KilnError("`kiln export --verify DIR` takes no RUN_DIR and no --to")
        names = verify_bundle(args.verify)
        print(f"OK: {len(names)} files verified in {args.verify}")
        return
    if args.run_dir is None or args.to is None:
        raise KilnError("use `kiln export RUN_DIR --to DIR` or `kiln export --verify DIR`")
    path = workflows.export_run(args.run_dir, args.to, args.checkpoint)
    print(f"exported to {path}")


def _names(text: str) -> list[str]:
    """Parse a non-empty comma-separated list of names (argparse reports the error)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _suites(text: str) -> list[str]:
    """Parse ``--suite a,b``; argparse turns the ValueError into a usage error."""
    names = _names(text)
    unknown = sorted(set(names) - {"ppl", "compile", "passk"})
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown suite(s) {unknown}; choose from ppl, compile, passk"
        )
    return names


def _positive_int(text: str) -> int:
    """Parse an integer >= 1 (argparse reports the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _temperature(text: str) -> float:
    """Parse a sampling temperature: finite and >= 0, 0 meaning greedy (argparse reports the
    error)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # not a number: rejected below with the same message
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0 (0 is greedy), got {text!r}"
        )
    return value


def _generate(args: argparse.Namespace, workflows: ModuleType) -> None:
    prefix, suffix = args.fim_prefix, args.fim_suffix
    fim_given = prefix is not None or suffix is not None
    if fim_given == (args.prompt is not None) or (fim_given and None in (prefix, suffix)):
        raise KilnError(
            "use `kiln generate RUN_DIR --prompt TEXT` to continue text, or "
            "`--fim-prefix A --fim-suffix B` (both) to fill in the middle"
        )
    print(workflows.generate(
        args.run_dir, args.prompt, fim=(prefix, suffix) if fim_given else None,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, which=args.checkpoint,
    ))


def _report(outcome: TrainOutcome) -> int:
    """Print the end of a training command; exit 130 if a signal stopped it.

    Of several data-parallel processes only rank 0 prints.
    """
    if os.environ.get("RANK", "0") != "0":
        return 130 if outcome.status == "interrupted" else 0
    print(f"run directory: {outcome.run_dir}")
    print(f"status: {outcome.status} at step {outcome.step}")
    if outcome.status == "interrupted":
        from kiln.workflows import resume_command  # imported already: it trained the run

        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun for its workers
        print(f"continue with: {resume_command(outcome.run_dir, world_size)}")
        return 130
    if outcome.val_ppl is not None:
        print(f"validation loss {outcome.val_loss:.4f}, perplexity {outcome.val_ppl:.2f}")
    elif outcome.val_loss is not None:
        print(f"validation loss {outcome.val_loss:.4g}")
    accuracy = {k: v for k, v in outcome.final_eval.items() if k.endswith("_accuracy")}
    if accuracy:  # a hashtron run
        print(", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in accuracy.items()))
    code_metrics = {k: v for k, v in outcome.final_eval.items()
                    if k == "compile_rate" or k.startswith("pass@")}
    if code_metrics:
        print(", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in code_metrics.items()))
    if outcome.report is not None:
        print(outcome.report)
    return 0


def _runs(root: Path | None) -> None:
    """Print the table of runs under ``root``; a root given that is no folder of runs is an
    error (a typo would otherwise read as "no runs")."""
    from kiln.run import SNAPSHOT, list_runs

    if root is None:  # the default folder is missing until the first run creates it
        root = Path("experiments")
    elif (root / SNAPSHOT).is_file():
        raise RunError(
            f"{root} is itself a run; `kiln runs DIR` lists the runs under a folder, "
            f"e.g. `kiln runs {root.parent}`"
        )
    elif not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise RunError(f"{root} {what}; give the folder that holds the runs (`run.root`)")
    _print_runs(list_runs(root))


def _print_runs(rows: list[dict]) -> None:
    if not rows:
        print("no runs found")
        return
    headers = ["id", "job", "status", "step", "loss", "val_ppl", "eval_acc"]

    def cell(value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [[cell(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    for line in [headers, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _launch(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Run this command in ``--nproc`` torchrun workers and return the exit code; None inside a
    worker, which goes on to run the command itself."""
    from kiln import launch, workflows
    from kiln.config import load_config

    if launch.under_torchrun():
        return None
    if args.command == "resume":  # completed, in use or changed inputs: said once, not per rank
        run = workflows.open_for_resume(args.run_dir, echo=False)
        run.close()
        config = run.config
    else:
        config = load_config(args.config, args.overrides)
    launch.check_launch(config, args.nproc)
    return launch.run_torchrun(args.nproc, argv)


# Errno values a user fixes, with the fix. An OSError with one of _BUG_ERRNOS means kiln misused
# a file or a call, so it keeps its traceback.
_OS_ERROR_HINTS = (
    ({errno.ENOSPC, errno.EDQUOT, errno.EFBIG}, "free disk space or choose another folder"),
    ({errno.EACCES, errno.EPERM, errno.EROFS}, "fix the permissions or choose another folder"),
    ({errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST}, "check the path in the config"),
)
_BUG_ERRNOS = {errno.EBADF, errno.EFAULT, errno.EINVAL, errno.ECHILD}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kiln` command."""
    _report_native_crashes()
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed stdout shows here rather than at interpreter exit
    except BrokenPipeError:
        # The reader quit early (`kiln runs | head`): the Python docs' idiom (signal module
        # notes) points stdout at devnull so the final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # what a shell reports for a tool stopped by SIGPIPE


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "nproc", None) is not None:
            code = _launch(args, sys.argv[1:] if argv is None else argv)
            if code is not None:
                return code
        return _run(args)
    except KilnError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # not a user error: main ends the command quietly
    except OSError as exc:
        if args.debug or exc.errno in _BUG_ERRNOS:
            raise
        print(f"error: {_describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _describe_os_error(exc: OSError) -> str:
    """One line: what the OS refused, on which file(s), and a fix where the errno suggests one."""
    if exc.strerror is None:  # raised with a message only
        return str(exc)
    names = [os.fsdecode(n) if isinstance(n, bytes) else str(n)
             for n in (exc.filename, exc.filename2) if n is not None]
    text = exc.strerror + (f": {' -> '.join(names)}" if names else "")
    hint = next((h for codes, h in _OS_ERROR_HINTS if exc.errno in codes), None)
    return f"{text} ({hint})" if hint else text


def _report_native_crashes() -> None:
    """Make a crash in native code (a segfault, an abort in a C++ library) print every thread's
    Python stack; torchrun and the shell otherwise report only the signal."""
    if not faulthandler.is_enabled() and sys.__stderr__ is not None:
        faulthandler.enable(file=sys.__stderr__, all_threads=True)


if __name__ == "__main__":
    sys.exit(main())
