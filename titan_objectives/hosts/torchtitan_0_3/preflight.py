"""Checks that run before torchtitan 0.3 allocates anything: a bad config fails in
seconds, with a message that names the CLI flag, the value and what is allowed."""

import copy
from pathlib import Path
from typing import Any

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.config.override import apply_overrides
from torchtitan.models.common.attention import FlexAttention
from torchtitan.models.common.decoder import Decoder

from titan_objectives.config import SECTION, ObjectivesConfigError
from titan_objectives.hosts.common.checks import (
    check_context_parallel_split,
    check_objectives,
    check_pipeline_validation,
)
from titan_objectives.hosts.common.corpus import DATASET_NAME, corpus_files
from titan_objectives.hosts.common.pipeline import ZERO_BUBBLE_SCHEDULES
from titan_objectives.hosts.common.run_record import RunRecord, as_record
from titan_objectives.hosts.common.runtime import CheckedConfig
from titan_objectives.hosts.torchtitan_0_3.model_adapter import (
    DecoderSharedModules,
    HostedObjectiveStack,
    model_info,
)


def model_config_of(config: Any) -> Decoder.Config:
    spec = config.model_spec
    if spec is None:
        raise ObjectivesConfigError(
            "the config has no model: --module M --config FN must name a config function "
            "that returns a Trainer.Config with model_spec set"
        )
    if not isinstance(spec.model, Decoder.Config):
        raise ObjectivesConfigError(
            f"--module {spec.name}: {type(spec.model).__qualname__} is not a decoder language "
            "model (models.common.decoder.Decoder); titan-objectives trains llama3, qwen3 and "
            "deepseek_v3"
        )
    if getattr(spec.model, "mtp_layers", None):
        raise ObjectivesConfigError(
            f"--module {spec.name} (flavor {spec.flavor!r}) has torchtitan's own MTP layers "
            f"({len(spec.model.mtp_layers)}); use a config without them and put mtp in "
            f"{SECTION}.stack instead (--objectives.stack ntp,mtp)"
        )
    # As the Trainer makes the model's config before building it, on a copy of the whole
    # config: its settings, then the overrides (--override.imports), which may replace
    # block configs the objectives' own blocks are built from.
    live = copy.deepcopy(config)
    live.model_spec.model.update_from_config(config=live)
    if live.override.imports:
        apply_overrides(live.override, live)
    return live.model_spec.model


def _check_flex_context_parallel(config: Any, model_config: Decoder.Config) -> None:
    """FlexAttention's context parallel shards the mask by whole blocks per rank."""
    attention = model_config.first_attention
    inner = getattr(attention, "inner_attention", None)
    if config.parallelism.context_parallel_degree > 1 and isinstance(inner, FlexAttention.Config):
        block = inner.block_size if isinstance(inner.block_size, int) else inner.block_size[0]
        check_context_parallel_split(config, block)


def _check_runtime(config: Any) -> None:
    if config.parallelism.spmd_backend != "partial_dtensor":
        raise ObjectivesConfigError(
            f"parallelism.spmd_backend = {config.parallelism.spmd_backend!r}: the objectives "
            "run on plain tensors, with DTensor for the model-parallel axes only; use "
            "--parallelism.spmd_backend partial_dtensor (with_objectives() sets it)"
        )
    if not config.training.disable_cuda_graphs:
        raise ObjectivesConfigError(
            "training.disable_cuda_graphs = False: the objectives' step (sampled geometry, "
            "host reads on logging steps) cannot be captured in a CUDA graph; pass "
            "--training.disable_cuda_graphs (the configs of titan_objectives.hosts."
            "torchtitan_0_3.config_registry and with_objectives() set it)"
        )


def _check_zero_bubble_recompute(config: Any) -> None:
    """torchtitan 0.3's selective AC allows one backward per checkpointed region."""
    parallelism = config.parallelism
    schedule = parallelism.pipeline_parallel_schedule
    selective = type(config.activation_checkpoint).__qualname__.startswith("SelectiveAC")
    if parallelism.pipeline_parallel_degree > 1 and schedule in ZERO_BUBBLE_SCHEDULES and selective:
        raise ObjectivesConfigError(
            f"activation_checkpoint:selective with parallelism.pipeline_parallel_schedule = "
            f"{schedule!r}: torch's selective activation checkpointing allows one backward "
            "per checkpointed region, and a zero-bubble schedule runs a second one for the "
            "weights (plain torchtitan 0.3 fails the same way); use activation_checkpoint:full "
            "or activation_checkpoint:none, or another schedule"
        )


def _check_paths(config: Any) -> None:
    assets = Path(config.hf_assets_path)
    if not (assets / "tokenizer.json").is_file():
        raise ObjectivesConfigError(
            f"hf_assets_path = {str(assets)!r} has no tokenizer.json (the bundled one: "
            "--hf_assets_path ./assets/tokenizer-bpe2k-tiny)"
        )
    loaders = [("dataloader", config.dataloader)]
    if config.validator.enable:
        loaders.append(("validator.dataloader", config.validator.dataloader))
    for key, loader in loaders:
        if getattr(loader, "dataset", None) == DATASET_NAME and loader.dataset_path:
            try:
                corpus_files(loader.dataset_path)
            except FileNotFoundError as error:
                raise ObjectivesConfigError(f"{key}.dataset_path: {error}") from None


def check_config(config: Any) -> CheckedConfig:
    """Everything the objectives need from a parsed config, validated; the stack is built
    here, once."""
    if not hasattr(config, SECTION):
        raise ObjectivesConfigError(
            "the config has no objectives section: build it with ObjectiveTrainer.Config or "
            "with_objectives(config) (titan_objectives.hosts.torchtitan_0_3)"
        )
    model_config = model_config_of(config)
    spec = config.model_spec
    checked = check_objectives(
        config,
        model_info(model_config, config.training.seq_len, DecoderSharedModules(model_config)),
        f"--module {spec.name} (flavor {spec.flavor!r})",
        TORCH_DTYPE_MAP[config.training.dtype],
        HostedObjectiveStack,
    )
    _check_runtime(config)
    _check_zero_bubble_recompute(config)
    if config.validator.enable:
        check_pipeline_validation(config, "validator.enable")
    _check_flex_context_parallel(config, model_config)
    _check_paths(config)
    if config.checkpoint.create_seed_checkpoint and not config.checkpoint.enable:
        raise ObjectivesConfigError(
            "checkpoint.create_seed_checkpoint needs checkpoint.enable: pass --checkpoint.enable"
        )
    return checked


def run_record(config: Any, checked: CheckedConfig) -> tuple[str, RunRecord]:
    """The dump folder, and what ``titan-objectives export`` reads from it later."""
    return config.dump_folder, RunRecord(
        host="torchtitan_0_3",
        model_name=config.model_spec.name,
        flavor=config.model_spec.flavor,
        model_args=as_record(model_config_of(config)),
        tokenizer=str(Path(config.hf_assets_path).resolve()) if config.hf_assets_path else "",
        checkpoint_folder=config.checkpoint.folder,
        stack=list(checked.options),
    )
