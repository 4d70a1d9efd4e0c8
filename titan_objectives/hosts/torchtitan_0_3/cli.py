"""``titan-objectives validate|describe --module M --config FN [--section.key value ...]``
on torchtitan 0.3: the config parsed and checked as training does, nothing allocated."""

from titan_objectives.config import ObjectivesConfigError
from titan_objectives.hosts.common.argv import flag_value
from titan_objectives.hosts.common.describe import ModelCost
from titan_objectives.hosts.common.hf_export import ExportableModel
from titan_objectives.hosts.common.parallel_check import CheckPlan
from titan_objectives.hosts.common.run_record import RunRecord
from titan_objectives.hosts.common.runtime import CheckedConfig
from titan_objectives.hosts.torchtitan_0_3.runtime import cpu as cpu_runtime

USAGE = "--module M --config FN [--section.key value ...] [--objectives.toml FILE]"


def checked_config(args: list[str]) -> tuple[CheckedConfig, ModelCost]:
    """The checked config of a command line and the model's cost (torchtitan's count,
    from the model built on the meta device)."""
    cpu_runtime.activate()
    import torch

    from titan_objectives.hosts.torchtitan_0_3.launch import parse_config
    from titan_objectives.hosts.torchtitan_0_3.preflight import check_config, model_config_of
    from titan_objectives.hosts.torchtitan_0_3.runtime.extensions import register_extensions

    if flag_value(args, ("--module",)) is None or flag_value(args, ("--config",)) is None:
        raise ObjectivesConfigError(f"expected --module and --config: {USAGE}")
    register_extensions()
    config = parse_config(args)
    checked = check_config(config)
    spec = config.model_spec
    model_config = model_config_of(config)
    with torch.device("meta"):
        model = model_config.build()
    seq_len = config.training.seq_len
    params, flops = model_config.get_nparams_and_flops(model, seq_len)
    label = f"{spec.name} {spec.flavor}"
    return checked, ModelCost(label, params, flops, seq_len, config.parallelism)


def config_name(args: list[str]) -> str:
    return f"--module {flag_value(args, ('--module',))} --config {flag_value(args, ('--config',))}"


def check_plan(args: list[str]) -> CheckPlan:
    """What ``check-parallel`` needs of a command line (which it has validated)."""
    from titan_objectives.hosts.torchtitan_0_3.launch import parse_config

    config = parse_config(args)
    loader = config.dataloader
    return CheckPlan(
        args,
        "--dump_folder",
        "--dataloader.dataset_path",
        getattr(loader, "dataset", ""),
        getattr(loader, "dataset_path", ""),
        config.parallelism,
    )


def exportable(record: RunRecord) -> ExportableModel:
    """A run's model as ``titan-objectives export`` converts it."""
    cpu_runtime.activate()
    from titan_objectives.hosts.torchtitan_0_3.export import exportable

    return exportable(record)
