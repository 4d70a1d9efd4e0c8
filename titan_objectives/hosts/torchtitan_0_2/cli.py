"""``titan-objectives validate|describe CONFIG.toml [--section.key value ...]`` on
torchtitan 0.2.2: the job config parsed and checked as training does, nothing allocated."""

from typing import Any

from titan_objectives.config import ObjectivesConfigError
from titan_objectives.hosts.common.argv import flag_value
from titan_objectives.hosts.common.describe import ModelCost
from titan_objectives.hosts.common.hf_export import ExportableModel
from titan_objectives.hosts.common.parallel_check import CheckPlan
from titan_objectives.hosts.common.run_record import RunRecord
from titan_objectives.hosts.common.runtime import CheckedConfig
from titan_objectives.hosts.torchtitan_0_2.runtime import cpu as cpu_runtime

USAGE = "CONFIG.toml [--section.key value ...]"


def _argv(args: list[str]) -> list[str]:
    """torchtitan's command line: the config file first, or named by its flag."""
    cpu_runtime.activate()  # before anything imports torchtitan
    from titan_objectives.hosts.torchtitan_0_2.preflight import CONFIG_FILE_FLAGS

    if flag_value(args, CONFIG_FILE_FLAGS) is not None:
        return args
    if not args or args[0].startswith("-"):
        raise ObjectivesConfigError(f"expected the job config first: {USAGE}")
    return ["--job.config_file", *args]


def _parsed(argv: list[str]) -> Any:
    """The job config of a torchtitan command line, its [objectives] table checked first."""
    from torchtitan.config import ConfigManager

    from titan_objectives.hosts.torchtitan_0_2.preflight import check_toml_file
    from titan_objectives.hosts.torchtitan_0_2.runtime.extensions import register_extensions

    register_extensions()
    check_toml_file(argv)
    try:
        return ConfigManager().parse_args(argv)
    except ValueError as error:  # torchtitan's unknown-key error, for other sections
        raise ObjectivesConfigError(str(error).splitlines()[0]) from None


def checked_config(args: list[str]) -> tuple[CheckedConfig, ModelCost]:
    """The checked config of a command line and the model's cost (torchtitan's count,
    from the model built on the meta device)."""
    job_config = _parsed(_argv(args))
    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    from titan_objectives.hosts.torchtitan_0_2.preflight import check_config, model_config_of

    checked = check_config(job_config)
    spec = get_train_spec(job_config.model.name)
    model_args = model_config_of(job_config)
    with torch.device("meta"):
        model = spec.model_cls(model_args)
    seq_len = job_config.training.seq_len
    params, flops = model_args.get_nparams_and_flops(model, seq_len)
    label = f"{job_config.model.name} {job_config.model.flavor}"
    return checked, ModelCost(label, params, flops, seq_len, job_config.parallelism)


def config_name(args: list[str]) -> str:
    from titan_objectives.hosts.torchtitan_0_2.preflight import CONFIG_FILE_FLAGS

    return flag_value(_argv(args), CONFIG_FILE_FLAGS)


def check_plan(args: list[str]) -> CheckPlan:
    """What ``check-parallel`` needs of a command line (which it has validated)."""
    argv = _argv(args)
    job_config = _parsed(argv)
    training = job_config.training
    return CheckPlan(
        argv,
        "--job.dump_folder",
        "--training.dataset_path",
        training.dataset,
        training.dataset_path,
        job_config.parallelism,
    )


def exportable(record: RunRecord) -> ExportableModel:
    """A run's model as ``titan-objectives export`` converts it."""
    cpu_runtime.activate()
    from titan_objectives.hosts.torchtitan_0_2.export import exportable

    return exportable(record)
