"""The ``titan-objectives`` command, on the installed torchtitan's host.

titan-objectives list                  registered objectives and their options
titan-objectives validate CONFIG ...   check a config as training would, without training
                                       (0.2.2: CONFIG.toml [--section.key value ...];
                                       0.3: --module M --config FN [--section.key value ...])
titan-objectives describe CONFIG ...   the parameters and FLOPs each objective adds
titan-objectives check-parallel [--nproc N] CONFIG ...
                                       a few steps under the parallelism asked vs 1 process
titan-objectives compare RUN... --out DIR [--evaluate]
                                       plots and tables from runs' TensorBoard logs (and
                                       their downstream scores)
titan-objectives export RUN_DIR --out DIR [--step N] [--tokenizer DIR] [--verify]
                                       a run's model as a Hugging Face transformers folder
titan-objectives evaluate DIR [--tasks T,...] [--limit N] [--step N] [--output-dir D]
                                       lm-evaluation-harness on an export (or a run's)
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from titan_objectives.hosts import installed_host_cli

# check-parallel's default: fp32 runs from one seed agree to about 1e-4 after a few steps.
TOLERANCE = 5e-4


def list_command() -> int:
    import textwrap

    from titan_objectives.options_doc import objective_summary, option_docs
    from titan_objectives.registry import broken_entry_points, list_objectives, objective_source

    for name, cls in list_objectives().items():
        print(f"{name}  ({objective_source(name)})")
        summary = objective_summary(cls)
        if summary:
            print(textwrap.fill(summary, width=92, initial_indent="    ", subsequent_indent="    "))
        for option in option_docs(cls.Options):
            print(f"    {option.name}: {option.type} = {option.default}")
            if option.help:
                print(f"        {option.help}")
        print()
    for name, reason in broken_entry_points().items():
        print(f"{name}  (unavailable: {reason})\n")
    return 0


def check_command(command: str, args: list[str]) -> int:
    """``validate``: check a config as training does, then describe it; ``describe``: the
    table alone. Both on the installed torchtitan's host."""
    from titan_objectives.config import ObjectivesConfigError, exit_on_config_error
    from titan_objectives.hosts.common.describe import describe

    host = installed_host_cli()
    try:
        checked, model = host.checked_config(args)
    except ObjectivesConfigError as error:
        exit_on_config_error(error)
    print(describe(model, checked.stack))
    if command == "validate":
        print(f"\n{host.config_name(args)}: OK")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from titan_objectives.evaluation.harness import requested_tasks
    from titan_objectives.hosts.common.run_record import ExportError
    from titan_objectives.report import compare_runs, event_files

    if not args.evaluate and (args.tasks or args.limit):
        raise ExportError("--tasks and --limit choose what --evaluate scores: add --evaluate")
    for run in args.runs:
        if not event_files(run):
            raise ExportError(
                f"RUN {run!r} holds no TensorBoard event files; compare reads runs' dump "
                "folders trained with metrics.enable_tensorboard"
            )

    tasks = requested_tasks(args.tasks) if args.evaluate else None
    for path in compare_runs(args.runs, args.out, args.evaluate, tasks, args.limit):
        print(path)
    return 0


def check_parallel_command(argv: list[str]) -> int:
    """Train a few steps in one process and under the parallelism asked, from one seed
    checkpoint, and compare what they log; exit 0 when every value agrees."""
    from titan_objectives.config import ObjectivesConfigError, exit_on_config_error
    from titan_objectives.hosts.common.parallel_check import (
        CheckRunError,
        check_parallel,
        report,
    )

    parser = argparse.ArgumentParser(
        prog="titan-objectives check-parallel",
        description=check_parallel_command.__doc__,
        allow_abbrev=False,
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes of the parallel run")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps compared")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help="largest relative difference allowed (a missing reduction or a wrong shift "
        "across shards shows at the percent level)",
    )
    parser.add_argument(
        "--work-dir",
        help="where the runs and their logs go, kept (default: a temporary folder, removed "
        "unless a training run failed)",
    )
    options, host_args = parser.parse_known_args(argv)
    host = installed_host_cli()
    try:
        host.checked_config(host_args)  # the checks training runs, before any training
        plan = host.check_plan(host_args)
        rows = check_parallel(plan, options.nproc, options.steps, options.work_dir)
    except ObjectivesConfigError as error:
        exit_on_config_error(error)
    except CheckRunError as error:
        print(f"titan-objectives check-parallel: {error}", file=sys.stderr)
        return 1
    print(report(plan, options.nproc, options.steps, rows, options.tolerance))
    return 0 if all(row.within(options.tolerance) for row in rows) else 1


def _export_or_evaluate_error(command: str, error: Exception) -> int:
    print(f"titan-objectives {command}: {error}", file=sys.stderr)
    return 2


def export_command(args: argparse.Namespace) -> int:
    from titan_objectives.evaluation.harness import require_eval_extra
    from titan_objectives.evaluation.runs import check_verifiable, export, verify

    if args.verify:  # what --verify needs, before anything is written
        require_eval_extra("--verify")
        check_verifiable(Path(args.run_dir), args.step)
    made = export(Path(args.run_dir), Path(args.out), args.step, args.tokenizer)
    print(f"{made.folder}: step {made.step}, {made.config['architectures'][0]}")
    if args.verify:
        print(verify(made))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from titan_objectives.evaluation.harness import evaluate, requested_tasks, task_manager
    from titan_objectives.evaluation.runs import model_folder, results_folder

    directory = Path(args.dir)
    tasks = requested_tasks(args.tasks)
    manager = task_manager(tasks)  # an unknown task fails here, before any export or load
    folder = model_folder(directory, args.step)
    output_dir = Path(args.output_dir) if args.output_dir else results_folder(directory)
    evaluation = evaluate(
        folder, tasks, output_dir, args.limit, args.batch_size, args.device, manager
    )
    print(evaluation.table())
    print(evaluation.results_file)
    return 0


def positive(text: str) -> int:
    """An argparse type: an integer above 0."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= 1")
    return value


def _add_export_and_evaluate(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="a run's model as a folder Hugging Face transformers loads"
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run's dump folder")
    export.add_argument("--out", required=True, help="a new folder for the export")
    export.add_argument("--step", type=int, help="the checkpoint step (default: the last)")
    export.add_argument(
        "--tokenizer", metavar="TOKENIZER_DIR", help="the tokenizer folder (default: the run's)"
    )
    export.add_argument(
        "--verify",
        action="store_true",
        help="load the export with transformers and compare its logits with torchtitan's",
    )
    evaluate = commands.add_parser(
        "evaluate", help="lm-evaluation-harness on an export (a run's is exported first)"
    )
    evaluate.add_argument("dir", metavar="DIR", help="an export, or a run's dump folder")
    evaluate.add_argument(
        "--tasks", help="comma-separated lm-eval tasks (default: the bundled local tasks)"
    )
    evaluate.add_argument("--limit", type=positive, help="documents per task (default: all)")
    evaluate.add_argument("--step", type=int, help="a run's checkpoint step (default: the last)")
    evaluate.add_argument(
        "--output-dir", help="where results go (default: the run's eval folder, RUN_DIR/eval)"
    )
    evaluate.add_argument("--batch-size", type=positive, default=16, help="lm-eval's batch size")
    evaluate.add_argument("--device", help="default: cuda when there is a GPU, else cpu")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="titan-objectives", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="registered objectives and their options")
    for command, help_text in (
        ("validate", "check a config as training would (meta device, no accelerator)"),
        ("describe", "the parameters and training FLOPs each objective adds"),
    ):
        checker = commands.add_parser(command, help=help_text)
        checker.add_argument(
            "args",
            nargs=argparse.REMAINDER,
            help="torchtitan 0.2.2: CONFIG.toml [--section.key value ...]; torchtitan 0.3: "
            "--module M --config FN [--section.key value ...] [--objectives.toml FILE]",
        )
    commands.add_parser(
        "check-parallel",
        help="an objective's numbers under a parallelism against one process's "
        "(check-parallel --help)",
    )
    compare = commands.add_parser(
        "compare", help="plots and a table of final values from runs' TensorBoard logs"
    )
    compare.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders holding TensorBoard event files"
    )
    compare.add_argument("--out", required=True, help="folder for the PNGs and summary.md")
    compare.add_argument(
        "--evaluate",
        action="store_true",
        help="also export and evaluate each run (its last checkpoint) and add their scores",
    )
    compare.add_argument("--tasks", help="with --evaluate: lm-eval tasks (default: bundled)")
    compare.add_argument("--limit", type=positive, help="with --evaluate: documents per task")
    _add_export_and_evaluate(commands)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["validate"], ["describe"]) and not {"-h", "--help"} & set(argv[1:2]):
        # Everything after the command is the host's command line, flags first on 0.3.
        return check_command(argv[0], argv[1:])
    if argv[:1] == ["check-parallel"]:
        return check_parallel_command(argv[1:])
    args = parser.parse_args(argv)

    if args.command in ("export", "evaluate", "compare"):
        from titan_objectives.hosts.common.run_record import ExportError

        try:
            if args.command == "export":
                return export_command(args)
            if args.command == "evaluate":
                return evaluate_command(args)
            return compare_command(args)
        except ExportError as error:
            return _export_or_evaluate_error(args.command, error)
    if args.command == "list":
        return list_command()
    return check_command(args.command, args.args)


if __name__ == "__main__":
    sys.exit(main())
