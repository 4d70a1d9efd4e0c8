"""Checks that run before torchtitan allocates anything: a bad config fails in seconds,
with a message that names the key, the value and what is allowed."""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan.protocols.train_spec import get_train_spec

from titan_objectives.config import (
    SECTION,
    GeometryOptions,
    ObjectivesConfigError,
    check_objectives_table,
    read_toml,
    resolve_stack,
)
from titan_objectives.hosts.common.checks import (
    check_parallelism,
    declarations,
    warn_if_nothing_reads_the_head,
)
from titan_objectives.hosts.common.corpus import DATASET_NAME, corpus_files
from titan_objectives.hosts.torchtitan_0_2.model_adapter import DecoderAdapter, get_model_adapter
from titan_objectives.objective import ModelInfo, ObjectiveOptions, Requirements


@dataclass
class CheckedConfig:
    adapter: DecoderAdapter
    model_info: ModelInfo
    options: dict[str, ObjectiveOptions]
    needs: dict[str, Requirements]
    """What each objective declares (see ``Requirements``), built on the meta device."""
    nonfinite: str
    geometry: GeometryOptions


def config_file_from_argv(argv: list[str]) -> str | None:
    """The TOML path on a torchtitan command line (``--job.config_file``), if any."""
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in ("--job.config_file", "--job.config-file"):
            return value or (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def check_toml_file(argv: list[str]) -> None:
    path = config_file_from_argv(argv)
    if path is None:
        return
    check_objectives_table(read_toml(path, "--job.config_file"))


def _model_info(job_config: Any) -> tuple[DecoderAdapter, ModelInfo]:
    name, flavor = job_config.model.name, job_config.model.flavor
    try:
        adapter = get_model_adapter(name)
    except ValueError as error:
        raise ObjectivesConfigError(str(error)) from None
    flavors = get_train_spec(name).model_args
    if flavor not in flavors:
        raise ObjectivesConfigError(
            f"model.flavor = {flavor!r} is not a {name} flavor; available: {', '.join(flavors)}"
        )
    return adapter, adapter.model_info(flavors[flavor], job_config.training.seq_len)


def declared_requirements(
    job_config: Any, adapter: DecoderAdapter, options: dict[str, ObjectiveOptions]
) -> dict[str, Requirements]:
    """Build each objective on the meta device, as the trainer will (blocks of the model's
    kind included, nothing allocated), and read what it declares. An objective that
    cannot be built for this model fails here, not after the data is loaded."""
    name, flavor = job_config.model.name, job_config.model.flavor
    model_args = copy.deepcopy(get_train_spec(name).model_args[flavor])
    model_args.update_from_config(job_config)  # as the Trainer does before building
    info = adapter.model_info(
        model_args, job_config.training.seq_len, shared=adapter.shared_modules(model_args)
    )
    return declarations(options, info, f"model.name = {name!r} (flavor {flavor!r})")


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


def check_job_config(job_config: Any) -> CheckedConfig:
    """Everything the objectives need from a parsed job config, validated."""
    if not hasattr(job_config, SECTION):
        raise ObjectivesConfigError(
            "the job config has no [objectives] section: set [job] custom_config_module = "
            '"titan_objectives.config" in the TOML (or --job.custom_config_module)'
        )
    adapter, model_info = _model_info(job_config)
    options = resolve_stack(job_config.objectives, model_info)
    needs = declared_requirements(job_config, adapter, options)
    warn_if_nothing_reads_the_head(options, needs)
    check_parallelism(job_config, options, needs)
    _check_paths(job_config)
    return CheckedConfig(
        adapter,
        model_info,
        options,
        needs,
        job_config.objectives.nonfinite,
        job_config.objectives.geometry,
    )
