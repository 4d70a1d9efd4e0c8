"""A torchtitan 0.2.2 llama3 with an objective stack, built as the host builds it."""

from typing import Any

from torchtitan.models.llama3 import Transformer

from tests.helpers import stack_of
from titan_objectives.config import GeometryOptions
from titan_objectives.hosts.common.runtime import CheckedConfig
from titan_objectives.hosts.torchtitan_0_2.model_adapter import (
    FAMILIES,
    DecoderSharedModules,
    model_info,
)
from titan_objectives.hosts.torchtitan_0_2.spec import model_class_with_objectives
from titan_objectives.objective import ObjectiveOptions


def llama3_with_objectives(model_args: Any, options: dict[str, ObjectiveOptions]) -> Any:
    """The model class the host's TrainSpec builds, with the stack of ``options``."""
    shared = DecoderSharedModules(model_args, FAMILIES["llama3"])
    info = model_info(model_args, model_args.max_seq_len, shared)
    checked = CheckedConfig(info, stack_of(options, info), "off", GeometryOptions())
    return model_class_with_objectives(Transformer, checked)(model_args)
