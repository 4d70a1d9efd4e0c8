"""Checks that run before torchtitan allocates anything: a bad config fails in seconds,
with a message that names the key, the value and what is allowed."""

import copy
from pathlib import Path
from typing import Any

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.protocols.train_spec import get_train_spec

from titan_objectives.config import (
    SECTION,
    ObjectivesConfigError,
    check_objectives_table,
    read_toml,
)
from titan_objectives.hosts.common.argv import flag_value
from titan_objectives.hosts.common.checks import check_objectives, check_pipeline_validation
from titan_objectives.hosts.common.corpus import DATASET_NAME, corpus_files
from titan_objectives.hosts.common.run_record import RunRecord, as_record
from titan_objectives.hosts.common.runtime import CheckedConfig
from titan_objectives.hosts.torchtitan_0_2.model_adapter import (
    DecoderSharedModules,
    model_family,
    model_info,
)

CONFIG_FILE_FLAGS = ("--job.config_file", "--job.config-file")


def check_toml_file(argv: list[str]) -> None:
    """The ``[objectives]`` table of the TOML the command line names, before torchtitan
    reads it (which checks neither keys by name nor types)."""
    path = flag_value(argv, CONFIG_FILE_FLAGS)
    if path is not None:
        check_objectives_table(read_toml(path, CONFIG_FILE_FLAGS[0]))


def model_config_of(job_config: Any) -> Any:
    """The model's arguments, as the Trainer makes them before building the model."""
    name, flavor = job_config.model.name, job_config.model.flavor
    flavors = get_train_spec(name).model_args
    if flavor not in flavors:
        raise ObjectivesConfigError(
            f"model.flavor = {flavor!r} is not a {name} flavor; available: {', '.join(flavors)}"
        )
    model_args = copy.deepcopy(flavors[flavor])
    model_args.update_from_config(job_config)
    return model_args


def _check_paths(job_config: Any) -> None:
    assets = job_config.model.hf_assets_path
    tokenizer_file = Path(assets, "tokenizer.json")
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # noqa: BLE001 - any parse failure means unreadable
            raise ObjectivesConfigError(
                f"model.hf_assets_path = {assets!r}: {tokenizer_file.name} cannot be read "
                f"as a tokenizer ({type(error).__name__}: {str(error)[:200]})"
            ) from None
    elif not Path(assets, "tokenizer.model").is_file():
        raise ObjectivesConfigError(
            f"model.hf_assets_path = {assets!r} has no tokenizer.json (or tokenizer.model)"
        )
    for section in ("training", "validation"):
        config = getattr(job_config, section)
        if section == "validation" and not config.enable:
            continue
        if config.dataset == DATASET_NAME and config.dataset_path:
            try:
                corpus_files(config.dataset_path)
            except FileNotFoundError as error:
                raise ObjectivesConfigError(f"{section}.dataset_path: {error}") from None


def check_config(job_config: Any) -> CheckedConfig:
    """Everything the objectives need from a parsed job config, validated; the stack is
    built here, once."""
    if not hasattr(job_config, SECTION):
        raise ObjectivesConfigError(
            "the job config has no [objectives] section: set [job] custom_config_module = "
            '"titan_objectives.config" in the TOML (or --job.custom_config_module)'
        )
    name, flavor = job_config.model.name, job_config.model.flavor
    family = model_family(name)  # before torchtitan imports a model it cannot serve
    model_args = model_config_of(job_config)
    shared = DecoderSharedModules(model_args, family)
    checked = check_objectives(
        job_config,
        model_info(model_args, job_config.training.seq_len, shared),
        f"model.name = {name!r} (flavor {flavor!r})",
        TORCH_DTYPE_MAP[job_config.training.dtype],
    )
    if job_config.validation.enable:
        check_pipeline_validation(job_config, "validation.enable")
    _check_paths(job_config)
    return checked


def run_record(job_config: Any, checked: CheckedConfig) -> tuple[str, RunRecord]:
    """The dump folder, and what ``titan-objectives export`` reads from it later."""
    dump_folder = job_config.job.dump_folder
    tokenizer = job_config.model.hf_assets_path
    return dump_folder, RunRecord(
        host="torchtitan_0_2",
        model_name=job_config.model.name,
        flavor=job_config.model.flavor,
        model_args=as_record(model_config_of(job_config)),
        tokenizer=str(Path(tokenizer).resolve()) if tokenizer else "",
        checkpoint_folder=job_config.checkpoint.folder,
        stack=list(checked.options),
    )
