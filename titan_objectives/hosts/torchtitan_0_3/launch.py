"""``python -m titan_objectives.train --module M --config FN [--section.key value ...]``
on torchtitan 0.3.

``M`` and ``FN`` are torchtitan's: a model name (``llama3``, ``deepseek_v3``, ``qwen3``)
and one of its config functions, or ``titan_objectives.hosts.torchtitan_0_3`` and one of
ours. A config that is not already an ``ObjectiveTrainer.Config`` is wrapped with
``with_objectives``. ``--objectives.toml FILE`` loads the ``[objectives]`` table of a
TOML file (the 0.2.2 syntax); ``--objectives.*`` flags apply on top of it.
"""

import sys
from typing import Any

from titan_objectives.hosts.torchtitan_0_3.runtime import cpu as cpu_runtime

TOML_FLAG = "--objectives.toml"


def objectives_table(path: str) -> dict[str, Any]:
    """The ``[objectives]`` table of a TOML file (empty if it has none)."""
    from titan_objectives.config import SECTION, ObjectivesConfigError, read_toml

    table = read_toml(path, TOML_FLAG).get(SECTION, {})
    if not isinstance(table, dict):
        raise ObjectivesConfigError(f"{TOML_FLAG} {path!r}: {SECTION} must be a table")
    return table


def parse_config(args: list[str]) -> Any:
    """An ``ObjectiveTrainer.Config`` from a torchtitan 0.3 command line."""
    from torchtitan.config.manager import ConfigManager

    from titan_objectives.config import objectives_from_table
    from titan_objectives.hosts.common.argv import flag_value, without_flag
    from titan_objectives.hosts.torchtitan_0_3.config_registry import with_objectives
    from titan_objectives.hosts.torchtitan_0_3.trainer import ObjectiveTrainer

    toml_path = flag_value(args, (TOML_FLAG,))
    args = without_flag(args, (TOML_FLAG,))
    section = objectives_from_table(objectives_table(toml_path)) if toml_path else None

    class ObjectiveConfigManager(ConfigManager):
        def _load_config(self, args: list[str]) -> tuple[object, list[str]]:
            loaded, rest = super()._load_config(args)
            if not isinstance(loaded, ObjectiveTrainer.Config):
                loaded = with_objectives(loaded)
            if section is not None:
                loaded.objectives = section
            return loaded, rest

    return ObjectiveConfigManager().parse_args(args)


def main(argv: list[str] | None = None, trainer_class: type | None = None) -> None:
    """Train with ``ObjectiveTrainer``, or ``trainer_class`` (a subclass of it; import it
    after ``cpu_runtime.activate()``, as torchtitan binds its device type at import)."""
    cpu_runtime.activate()

    import torch
    from torchtitan.tools.logging import init_logger

    from titan_objectives.config import ObjectivesConfigError, exit_on_config_error
    from titan_objectives.hosts.common.nonfinite import NonFiniteLossError
    from titan_objectives.hosts.torchtitan_0_3.runtime.extensions import register_extensions

    init_logger()
    register_extensions()
    trainer = None
    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
        trainer = trainer_class(config) if trainer_class is not None else config.build()
        if config.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            trainer.train()
    except ObjectivesConfigError as error:
        exit_on_config_error(error)
    except NonFiniteLossError as error:
        print(f"titan-objectives: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    finally:
        if trainer is not None:
            trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    cpu_runtime.exit_after_training()
