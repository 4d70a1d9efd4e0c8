"""Config functions for ``--module titan_objectives.hosts.torchtitan_0_3 --config FN``,
and ``with_objectives``, which turns any torchtitan 0.3 config into one that trains
objectives.

The debug configs train on the bundled text and tokenizer (torchtitan's own debug
configs point at test assets its wheel does not ship), in fp32, sized for a CPU.
"""

import dataclasses
from typing import Any

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel
from torchtitan.models.llama3.config_registry import llama3_debugmodel
from torchtitan.models.qwen3.config_registry import qwen3_debugmodel
from torchtitan.trainer import Trainer

from titan_objectives.config import Objectives
from titan_objectives.hosts.common.corpus import ASSETS, DATASET_NAME, DEFAULT_TRAIN_PATH
from titan_objectives.hosts.torchtitan_0_3.trainer import ObjectiveTrainer

TOKENIZER = ASSETS / "tokenizer-bpe2k-tiny"
VALIDATION_PATH = ASSETS / "tiny" / "val.txt"


def with_objectives(
    config: Trainer.Config, objectives: Any = None, **section: Any
) -> ObjectiveTrainer.Config:
    """``config`` (any ``Trainer.Config``, e.g. from torchtitan's own config functions)
    as an ``ObjectiveTrainer.Config``, with ``objectives`` (an ``Objectives``) or the
    section's fields as keywords: ``with_objectives(llama3_8b(), stack=["ntp", "nitp"])``.
    CUDA graphs are switched off (the objectives' step is not capturable), and the
    SPMD backend is ``partial_dtensor`` (objectives run on plain tensors, with DTensor for
    the model-parallel axes only, as on torchtitan 0.2.2)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields["objectives"] = objectives if objectives is not None else Objectives(**section)
    fields["training"] = dataclasses.replace(config.training, disable_cuda_graphs=True)
    fields["parallelism"] = dataclasses.replace(config.parallelism, spmd_backend="partial_dtensor")
    return ObjectiveTrainer.Config(**fields)


def _on_bundled_data(config: Trainer.Config, **training: Any) -> Trainer.Config:
    """A torchtitan debug config on the bundled tokenizer and text, fp32, CPU-sized, with
    TensorBoard on (as the 0.2.2 host's TOML configs)."""
    dataloader = HuggingFaceTextDataLoader.Config(
        dataset=DATASET_NAME, dataset_path=str(DEFAULT_TRAIN_PATH)
    )
    validation = dataclasses.replace(
        config.validator,
        dataloader=HuggingFaceTextDataLoader.Config(
            dataset=DATASET_NAME, dataset_path=str(VALIDATION_PATH), infinite=False
        ),
    )
    sizes = {"local_batch_size": 8, "seq_len": 256, "steps": 300, **training}
    return dataclasses.replace(
        config,
        hf_assets_path=str(TOKENIZER),
        dataloader=dataloader,
        validator=validation,
        metrics=dataclasses.replace(config.metrics, enable_tensorboard=True),
        training=dataclasses.replace(
            config.training, mixed_precision_param="float32", dtype="float32", **sizes
        ),
    )


def llama3_debug_torchtitan() -> Trainer.Config:
    """torchtitan's own trainer and cross-entropy loss on ``llama3_debug``'s settings: the
    reference of ``ntp`` alone (``with_objectives`` of it is ``llama3_debug``)."""
    config = _on_bundled_data(llama3_debugmodel())
    return dataclasses.replace(
        config,
        loss=CrossEntropyLoss.Config(),
        training=dataclasses.replace(config.training, disable_cuda_graphs=True),
        parallelism=dataclasses.replace(config.parallelism, spmd_backend="partial_dtensor"),
    )


def llama3_debug() -> ObjectiveTrainer.Config:
    """Llama3 debug model (dim 256, 6 blocks, 2k vocab), ntp alone, on the bundled text."""
    return with_objectives(llama3_debug_torchtitan(), stack=["ntp"])


def llama3_debug_nitp() -> ObjectiveTrainer.Config:
    """The main job: llama3 debug model, next-token + next-implicit-token prediction."""
    config = llama3_debug()
    config.objectives.stack = ["ntp", "nitp"]
    config.objectives.nitp.target_layer = 2
    return config


def deepseek_v3_debug() -> ObjectiveTrainer.Config:
    """DeepSeek-V3 debug model (MoE, MLA), ntp alone, on the bundled text."""
    return with_objectives(_on_bundled_data(deepseek_v3_debugmodel()), stack=["ntp"])


def qwen3_debug() -> ObjectiveTrainer.Config:
    """Qwen3 debug model (tied embeddings), ntp alone, on the bundled text."""
    return with_objectives(_on_bundled_data(qwen3_debugmodel()), stack=["ntp"])
