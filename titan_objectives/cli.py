"""The ``titan-objectives`` command, on the installed torchtitan's host.

titan-objectives list                  registered objectives and their options
titan-objectives validate CONFIG ...   check a config as training would, without training
                                       (0.2.2: CONFIG.toml [--section.key value ...];
                                       0.3: --module M --config FN [--section.key value ...])
titan-objectives describe CONFIG ...   the parameters and FLOPs each objective adds
titan-objectives compare RUN... --out DIR   plots and a table from runs' TensorBoard logs
"""

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from titan_objectives.hosts import installed_host


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
    compare = commands.add_parser(
        "compare", help="plots and a table of final values from runs' TensorBoard logs"
    )
    compare.add_argument("runs", nargs="+", help="run folders holding TensorBoard event files")
    compare.add_argument("--out", required=True, help="folder for the PNGs and summary.md")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["validate"], ["describe"]) and not {"-h", "--help"} & set(argv[1:2]):
        # Everything after the command is the host's command line, flags first on 0.3.
        return check_command(argv[0], argv[1:])
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
