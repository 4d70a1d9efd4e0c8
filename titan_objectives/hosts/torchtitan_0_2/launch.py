"""``python -m titan_objectives.train --job.config_file CONFIG.toml [--section.key value ...]``
on torchtitan 0.2.2: its own entry point (``torchtitan.train.main``) with the objective trainer.
On a machine without CUDA the CPU runtime is switched on first, automatically.
"""

import sys

from titan_objectives.hosts.torchtitan_0_2.runtime import cpu as cpu_runtime


def main(argv: list[str] | None = None, trainer_class: type | None = None) -> None:
    """Train with ``ObjectiveTrainer``, or ``trainer_class`` (a subclass of it; import it
    after ``cpu_runtime.activate()``, as torchtitan binds its device type at import)."""
    cpu_runtime.activate()

    import torchtitan.train

    from titan_objectives.config import ObjectivesConfigError, exit_on_config_error
    from titan_objectives.hosts.common.nonfinite import NonFiniteLossError
    from titan_objectives.hosts.torchtitan_0_2.preflight import check_toml_file
    from titan_objectives.hosts.torchtitan_0_2.runtime.extensions import register_extensions
    from titan_objectives.hosts.torchtitan_0_2.trainer import ObjectiveTrainer

    argv = sys.argv[1:] if argv is None else argv
    register_extensions()
    try:
        check_toml_file(argv)
        torchtitan.train.main(trainer_class or ObjectiveTrainer)
    except ObjectivesConfigError as error:
        exit_on_config_error(error)
    except NonFiniteLossError as error:
        print(f"titan-objectives: {error}", file=sys.stderr)
        raise SystemExit(3) from None
    cpu_runtime.exit_after_training()
