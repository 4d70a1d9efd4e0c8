"""Checks that run before torchtitan allocates anything: a bad config fails in seconds,
with a message that names the key, the value and what is allowed."""

import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
import torch
from torchtitan.protocols.train_spec import get_train_spec

from titan_objectives.config import (
    SECTION,
    GeometryOptions,
    ObjectivesConfigError,
    resolve_stack,
)
from titan_objectives.integration.datasets import DATASET_NAME, corpus_files
from titan_objectives.integration.model_adapter import DecoderAdapter, get_model_adapter
from titan_objectives.objective import ModelInfo, ObjectiveOptions
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


def _reads_output_head(name: str, options: ObjectiveOptions) -> bool:
    """Whether an objective uses the LM head's weight outside the model's forward."""
    return name == "mtp" or getattr(options, "chunk_size", 0) > 0


def _check_model_blocks(
    job_config: Any, adapter: DecoderAdapter, options: dict[str, ObjectiveOptions]
) -> None:
    """MTP adds blocks of the model's own kind: build one on the meta device now, so a
    model whose blocks cannot be built that way fails here, not after loading data."""
    if "mtp" not in options:
        return
    name, flavor = job_config.model.name, job_config.model.flavor
    model_args = copy.deepcopy(get_train_spec(name).model_args[flavor])
    try:
        model_args.update_from_config(job_config)  # as the Trainer does before building
        with torch.device("meta"):
            adapter.block_class()(model_args.n_layers, model_args)
    except Exception as error:  # noqa: BLE001 - any failure means the variant cannot be built
        raise ObjectivesConfigError(
            f"{SECTION}.mtp.variant = {options['mtp'].variant!r} with model.name = {name!r} "
            f"(flavor {flavor!r}): MTP needs an extra block of the model's own kind, and "
            f"{adapter.block_module}.TransformerBlock cannot be built "
            f"({type(error).__name__}: {str(error)[:200]}); remove mtp from the stack"
        ) from None


def _check_parallelism(job_config: Any, options: dict[str, ObjectiveOptions]) -> None:
    parallelism = job_config.parallelism
    stack = f"{SECTION}.stack = {list(options)!r}"
    # torchtitan's own loss path, which every parallelism supports.
    plain_ntp = list(options) == ["ntp"] and options["ntp"] == type(options["ntp"])()
    shifted = [name for name in options if name != "ntp"]
    head_readers = [name for name, opts in options.items() if _reads_output_head(name, opts)]

    if parallelism.pipeline_parallel_degree > 1 and not plain_ntp:
        raise ObjectivesConfigError(
            f"{stack} with parallelism.pipeline_parallel_degree = "
            f"{parallelism.pipeline_parallel_degree}: only a plain ntp stack (default options) "
            "runs under pipeline parallelism (the loss is computed inside torchtitan's "
            "schedule on the last stage, which does not see other stages' hidden states); "
            "use FSDP instead"
        )
    if parallelism.context_parallel_degree > 1 and shifted:
        raise ObjectivesConfigError(
            f"{stack} with parallelism.context_parallel_degree = "
            f"{parallelism.context_parallel_degree}: context parallelism reorders the "
            f"sequence, which {', '.join(shifted)} shift by position; use FSDP instead"
        )
    if parallelism.tensor_parallel_degree > 1:
        _check_tensor_parallel(job_config, options)
    if head_readers and parallelism.fsdp_reshard_after_forward == "always":
        raise ObjectivesConfigError(
            f"parallelism.fsdp_reshard_after_forward = 'always' with "
            f"{', '.join(head_readers)}: they read the output head's weight after the forward, "
            "which 'always' frees; use 'default' or 'never'"
        )


def _check_tensor_parallel(job_config: Any, options: dict[str, ObjectiveOptions]) -> None:
    degree = job_config.parallelism.tensor_parallel_degree
    tp = f"parallelism.tensor_parallel_degree = {degree}"
    unsupported = [name for name in options if not get_objective(name).sequence_parallel]
    if unsupported:
        raise ObjectivesConfigError(
            f"{SECTION}.stack has {', '.join(unsupported)}, which cannot run with {tp}: the "
            "objective does not declare sequence_parallel = True (see the README, 'Adding an "
            "objective'); use FSDP (data_parallel_shard_degree) instead"
        )
    for name, opts in options.items():
        chunk_size = getattr(opts, "chunk_size", 0)
        if chunk_size:
            raise ObjectivesConfigError(
                f"{SECTION}.{name}.chunk_size = {chunk_size} with {tp}: the chunked "
                "cross-entropy needs the whole vocabulary on each rank; under tensor "
                "parallelism the logits are already split over the vocabulary (loss "
                "parallel). Set chunk_size = 0"
            )
    shard = job_config.training.seq_len // degree
    depth = getattr(options.get("mtp"), "depth", 0)
    if depth > shard:
        raise ObjectivesConfigError(
            f"{SECTION}.mtp.depth = {depth} with {tp} and training.seq_len = "
            f"{job_config.training.seq_len}: each rank holds {shard} positions, and a depth "
            "may not shift further than one shard; use a depth <= "
            f"{shard} or a smaller tensor_parallel_degree"
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
    _check_model_blocks(job_config, adapter, options)
    _check_parallelism(job_config, options)
    _check_paths(job_config)
    return CheckedConfig(
        adapter,
        model_info,
        options,
        job_config.objectives.nonfinite,
        job_config.objectives.geometry,
    )


def exit_on_config_error(error: ObjectivesConfigError) -> None:
    print(f"titan-objectives: config error: {error}", file=sys.stderr)
    raise SystemExit(2)
