"""The ``titan-objectives`` command.

titan-objectives list                       registered objectives and their options
titan-objectives validate CONFIG.toml [--section.key value ...]
                                            check a job config without training
"""

import argparse
import copy
import sys
from collections.abc import Sequence


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


def _parse_job_config(argv: list[str]):
    from torchtitan.config import ConfigManager

    from titan_objectives.config import ObjectivesConfigError
    from titan_objectives.hosts.torchtitan_0_2.preflight import check_toml_file

    check_toml_file(argv)
    try:
        return ConfigManager().parse_args(argv)
    except ValueError as error:  # torchtitan's unknown-key error, for other sections
        raise ObjectivesConfigError(str(error).splitlines()[0]) from None


def objective_costs(job_config, checked) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """The model's parameters and training FLOPs per token (torchtitan's count), and each
    objective's extra parameters and FLOPs per token, from models built on the meta
    device (nothing allocated)."""
    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    from titan_objectives.hosts.torchtitan_0_2.spec import model_class_with_objectives

    spec = get_train_spec(job_config.model.name)
    model_args = copy.deepcopy(spec.model_args[job_config.model.flavor])
    model_args.update_from_config(job_config)
    with torch.device("meta"):
        model = spec.model_cls(model_args)
        with_objectives = model_class_with_objectives(
            spec.model_cls, checked.adapter, checked.options
        )(model_args)
    params, flops = model_args.get_nparams_and_flops(model, job_config.training.seq_len)
    extra = {
        name: (sum(p.numel() for p in objective.parameters()), objective.flops_per_token())
        for name, objective in with_objectives.objectives.objectives().items()
    }
    return params, flops, extra


def describe(job_config, checked) -> str:
    """The stack against the model: parameters and training FLOPs each objective adds."""
    params, flops, extra = objective_costs(job_config, checked)
    seq_len = job_config.training.seq_len
    lines = [
        f"model: {job_config.model.name} {job_config.model.flavor}, {params:,} parameters, "
        f"{flops / 1e6:,.1f} MFLOPs per token for training (torchtitan's count, seq_len {seq_len})",
        f"stack: {' + '.join(checked.options)}",
        "",
        f"{'objective':<10} {'weight':>8} {'extra params':>14} {'extra MFLOPs/token':>20} "
        f"{'overhead':>9}",
    ]
    for name, (extra_params, extra_flops) in extra.items():
        options = checked.options[name]
        weight = options.weight if options.schedule == "constant" else f"{options.weight:g}*"
        lines.append(
            f"{name:<10} {weight:>8} {extra_params:>14,} {extra_flops / 1e6:>20,.2f} "
            f"{100 * extra_flops / flops:>8.2f}%"
        )
    total_params = sum(p for p, _ in extra.values())
    total_flops = sum(f for _, f in extra.values())
    lines.append(
        f"{'total':<10} {'':>8} {total_params:>14,} {total_flops / 1e6:>20,.2f} "
        f"{100 * total_flops / flops:>8.2f}%"
    )
    if any(o.schedule != "constant" for o in checked.options.values()):
        lines.append("* weight at step 1; it follows the objective's schedule")
    return "\n".join(lines)


def validate_command(config: str, overrides: Sequence[str]) -> int:
    from titan_objectives.config import ObjectivesConfigError, exit_on_config_error
    from titan_objectives.hosts.torchtitan_0_2.preflight import check_job_config
    from titan_objectives.hosts.torchtitan_0_2.runtime.extensions import register_extensions

    register_extensions()
    argv = ["--job.config_file", config, *overrides]
    try:
        job_config = _parse_job_config(argv)
        checked = check_job_config(job_config)
    except ObjectivesConfigError as error:
        exit_on_config_error(error)
    print(describe(job_config, checked))
    print(f"\n{config}: OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="titan-objectives", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="registered objectives and their options")
    validate = commands.add_parser(
        "validate",
        help="check a job config against its model (meta device, no accelerator)",
    )
    validate.add_argument("config", help="job TOML")
    validate.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value ...")
    compare = commands.add_parser(
        "compare", help="plots and a table of final values from runs' TensorBoard logs"
    )
    compare.add_argument("runs", nargs="+", help="run folders holding TensorBoard event files")
    compare.add_argument("--out", required=True, help="folder for the PNGs and summary.md")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if args.command == "compare":
        from titan_objectives.report import compare_runs

        for path in compare_runs(args.runs, args.out):
            print(path)
        return 0
    if args.command == "list":
        return list_command()
    # validate reads TOML job configs: the torchtitan 0.2.2 host's.
    from titan_objectives.hosts.torchtitan_0_2.runtime import cpu as cpu_runtime

    cpu_runtime.activate()
    return validate_command(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
