"""Checks that run before torchtitan allocates anything: a bad config fails in seconds,
with a message that names the key, the value and what is allowed."""

import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.logging import logger

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI
    import tomli as tomllib

from titan_objectives.config import (
    SECTION,
    GeometryOptions,
    ObjectivesConfigError,
    resolve_stack,
)
from titan_objectives.integration.datasets import DATASET_NAME, corpus_files
from titan_objectives.integration.model_adapter import DecoderAdapter, get_model_adapter
from titan_objectives.objective import ModelInfo, ObjectiveOptions, Requirements
from titan_objectives.registry import (
    RESERVED_NAMES,
    broken_entry_points,
    get_objective,
    list_objectives,
)


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


def check_objectives_table(toml: dict[str, Any]) -> None:
    """Unknown keys in ``[objectives]`` and its sub-tables, with what is allowed.

    torchtitan would reject them too, but naming only a Python class."""
    table = toml.get(SECTION)
    if table is None:
        return
    if not isinstance(table, dict):
        raise ObjectivesConfigError(f"{SECTION} must be a table, got {table!r}")
    registered = list_objectives()
    broken = broken_entry_points()
    for key, value in table.items():
        if key == "geometry" and isinstance(value, dict):
            allowed = [f.name for f in dataclasses.fields(GeometryOptions)]
            for option in value:
                if option not in allowed:
                    raise ObjectivesConfigError(
                        f"unknown option {SECTION}.geometry.{option}; allowed: {', '.join(allowed)}"
                    )
            continue
        if key in RESERVED_NAMES:
            continue
        if key in broken:
            raise ObjectivesConfigError(f"[{SECTION}.{key}]: {broken[key]}")
        if key not in registered:
            raise ObjectivesConfigError(
                f"unknown key {SECTION}.{key}; allowed: {', '.join(RESERVED_NAMES)}, "
                + ", ".join(f"[{SECTION}.{n}]" for n in registered)
            )
        if not isinstance(value, dict):
            raise ObjectivesConfigError(
                f"{SECTION}.{key} must be a table of options, got {value!r}"
            )
        allowed = [f.name for f in dataclasses.fields(registered[key].Options)]
        for option in value:
            if option not in allowed:
                raise ObjectivesConfigError(
                    f"unknown option {SECTION}.{key}.{option}; allowed: {', '.join(allowed)}"
                )


def check_toml_file(argv: list[str]) -> None:
    path = config_file_from_argv(argv)
    if path is None:
        return
    try:
        with open(path, "rb") as f:
            toml = tomllib.load(f)
    except FileNotFoundError:
        raise ObjectivesConfigError(f"--job.config_file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ObjectivesConfigError(
            f"--job.config_file {path!r} is not valid TOML: {error}"
        ) from None
    check_objectives_table(toml)


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


def _settings(options: ObjectiveOptions) -> str:
    """The options a user set (those that differ from the defaults), for messages."""
    defaults = type(options)()
    changed = [
        f"{f.name} = {getattr(options, f.name)!r}"
        for f in dataclasses.fields(options)
        if getattr(options, f.name) != getattr(defaults, f.name)
    ]
    return f" ({', '.join(changed)})" if changed else ""


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
    needs = {}
    for objective, opts in options.items():
        try:
            with torch.device("meta"):
                needs[objective] = get_objective(objective)(opts, info).requirements()
        except Exception as error:  # noqa: BLE001 - any failure means it cannot be built
            raise ObjectivesConfigError(
                f"{SECTION}.stack has {objective!r}{_settings(opts)}, which cannot be built "
                f"for model.name = {name!r} (flavor {flavor!r}): {type(error).__name__}: "
                f"{str(error)[:300]}; remove it from the stack"
            ) from None
    return needs


def _check_parallelism(
    job_config: Any, options: dict[str, ObjectiveOptions], needs: dict[str, Requirements]
) -> None:
    parallelism = job_config.parallelism
    stack = f"{SECTION}.stack = {list(options)!r}"
    # torchtitan's own loss path, which every parallelism supports. The one decision on a
    # built-in's name: it is a statement about torchtitan's step, not about an objective.
    plain_ntp = list(options) == ["ntp"] and options["ntp"] == type(options["ntp"])()

    if parallelism.pipeline_parallel_degree > 1 and not plain_ntp:
        raise ObjectivesConfigError(
            f"{stack} with parallelism.pipeline_parallel_degree = "
            f"{parallelism.pipeline_parallel_degree}: only a plain ntp stack (default options) "
            "runs under pipeline parallelism (the loss is computed inside torchtitan's "
            "schedule on the last stage, which does not see other stages' hidden states); "
            "use FSDP instead"
        )
    shifting = [name for name, need in needs.items() if need.lookahead > 0]
    if parallelism.context_parallel_degree > 1 and shifting:
        read_ahead = ", ".join(
            f"{name}{_settings(options[name])} reads {needs[name].lookahead} position(s) ahead"
            for name in shifting
        )
        raise ObjectivesConfigError(
            f"{stack} with parallelism.context_parallel_degree = "
            f"{parallelism.context_parallel_degree}: context parallelism reorders the "
            f"sequence, and {read_ahead}; use FSDP or TP instead"
        )
    if parallelism.tensor_parallel_degree > 1:
        _check_tensor_parallel(job_config, options, needs)
    head_readers = [name for name, need in needs.items() if need.output_weight]
    if head_readers and parallelism.fsdp_reshard_after_forward == "always":
        raise ObjectivesConfigError(
            f"parallelism.fsdp_reshard_after_forward = 'always' with "
            f"{', '.join(head_readers)}: they read the output head's weight after the forward, "
            "which 'always' frees; use 'default' or 'never'"
        )


def _check_tensor_parallel(
    job_config: Any, options: dict[str, ObjectiveOptions], needs: dict[str, Requirements]
) -> None:
    degree = job_config.parallelism.tensor_parallel_degree
    tp = f"parallelism.tensor_parallel_degree = {degree}"
    unsupported = [name for name in options if not get_objective(name).sequence_parallel]
    if unsupported:
        raise ObjectivesConfigError(
            f"{SECTION}.stack has {', '.join(unsupported)}, which cannot run with {tp}: the "
            "objective does not declare sequence_parallel = True (see the README, 'Write your "
            "own objective'); use FSDP (data_parallel_shard_degree) instead"
        )
    for name, need in needs.items():
        if need.whole_vocabulary:
            raise ObjectivesConfigError(
                f"{SECTION}.{name}{_settings(options[name])} with {tp}: these options need the "
                "whole vocabulary on each rank, and tensor parallelism splits the output head "
                "over the vocabulary; change them (for ntp and mtp: ce_backend = 'auto' or "
                "'chunked', whose chunks split the vocabulary too) or use FSDP instead"
            )
    shard = job_config.training.seq_len // degree
    for name, need in needs.items():
        if need.shard_reach > shard:
            raise ObjectivesConfigError(
                f"{SECTION}.{name}{_settings(options[name])} reads hidden states "
                f"{need.shard_reach} positions ahead, with {tp} and training.seq_len = "
                f"{job_config.training.seq_len}: each rank holds {shard} positions of them, "
                "and an objective may not read further than one shard ahead; read at most "
                f"{shard} ahead or use a smaller tensor_parallel_degree"
            )


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
    if not any(need.logits or need.output_weight for need in needs.values()):
        logger.warning(
            f"{SECTION}.stack = {list(options)!r}: no objective reads the output head (its "
            "logits or its weight), so the model will not be trained to predict tokens; "
            "add ntp"
        )
    _check_parallelism(job_config, options, needs)
    _check_paths(job_config)
    return CheckedConfig(
        adapter,
        model_info,
        options,
        needs,
        job_config.objectives.nonfinite,
        job_config.objectives.geometry,
    )


def exit_on_config_error(error: ObjectivesConfigError) -> None:
    print(f"titan-objectives: config error: {error}", file=sys.stderr)
    raise SystemExit(2)
