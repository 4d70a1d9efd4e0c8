"""The ``titan-objectives`` command, on the installed torchtitan's host.

titan-objectives list                  registered objectives and their options
titan-objectives validate CONFIG ...   check a config as training would, without training
                                       (0.2.2: CONFIG.toml [--section.key value ...];
                                       0.3: --module M --config FN [--section.key value ...])
titan-objectives describe CONFIG ...   the parameters and FLOPs each objective adds
titan-objectives check-parallel [--nproc N] CONFIG ...
                                       a few steps under the parallelism asked vs 1 process
titan-objectives compare RUN... --out DIR   plots and a table from runs' TensorBoard logs
"""

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from titan_objectives.hosts import installed_host

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


def _host_cli() -> ModuleType:
    return importlib.import_module(f"{installed_host()}.cli")


def check_command(command: str, args: list[str]) -> int:
    """``validate``: check a config as training does, then describe it; ``describe``: the
    table alone. Both on the installed torchtitan's host."""
    from titan_objectives.config import ObjectivesConfigError, exit_on_config_error
    from titan_objectives.hosts.common.describe import describe

    host = _host_cli()
    try:
        checked, model = host.checked_config(args)
    except ObjectivesConfigError as error:
        exit_on_config_error(error)
    print(describe(model, checked.stack))
    if command == "validate":
        print(f"\n{host.config_name(args)}: OK")
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
    parser.add_argument("--work-dir", help="where the runs go (default: a new temporary folder)")
    options, host_args = parser.parse_known_args(argv)
    host = _host_cli()
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
    compare.add_argument("runs", nargs="+", help="run folders holding TensorBoard event files")
    compare.add_argument("--out", required=True, help="folder for the PNGs and summary.md")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["validate"], ["describe"]) and not {"-h", "--help"} & set(argv[1:2]):
        # Everything after the command is the host's command line, flags first on 0.3.
        return check_command(argv[0], argv[1:])
    if argv[:1] == ["check-parallel"]:
        return check_parallel_command(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "compare":
        from titan_objectives.report import compare_runs

        for path in compare_runs(args.runs, args.out):
            print(path)
        return 0
    if args.command == "list":
        return list_command()
    return check_command(args.command, args.args)


if __name__ == "__main__":
    sys.exit(main())
