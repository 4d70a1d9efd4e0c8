"""torchtitan 0.3 components with the objectives' behaviour, each with its own ``Config``
so that ``config.build()`` makes them (torchtitan 0.3 builds every component from its
config class): the metrics processor logs the objectives' values, the checkpointer fits
checkpoints to the stack and leaves the objectives out of model-only saves."""

import dataclasses
from dataclasses import dataclass
from typing import Any

from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.metrics import MetricsProcessor

from titan_objectives.config import ObjectivesConfigError
from titan_objectives.hosts.common.checkpoint_state import ObjectiveCheckpointing
from titan_objectives.hosts.common.running_metrics import ObjectiveMetricsLogging


class ObjectiveMetricsProcessor(ObjectiveMetricsLogging, MetricsProcessor):
    """torchtitan's processor, plus the objectives' values on the logging steps."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        pass


class ObjectiveCheckpointManager(ObjectiveCheckpointing, CheckpointManager):
    """torchtitan's DCP checkpointer, fitted to the objective stack."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass


def as_config(value: Any, config_class: type, key: str) -> Any:
    """``value`` (a config of ``config_class``'s parent class) as a ``config_class``, so
    that it builds the objectives' component; ``key`` names the config field in errors."""
    if isinstance(value, config_class):
        return value
    base = config_class.__mro__[1]
    if type(value) is not base:
        raise ObjectivesConfigError(
            f"{key} is a {type(value).__qualname__}: titan-objectives extends torchtitan's "
            f"{base.__qualname__} and cannot combine with another one; use {base.__qualname__}"
        )
    return config_class(**{f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
