"""``python -m titan_objectives.hosts.torchtitan_0_3.baseline --module M --config FN``:
torchtitan 0.3's own ``torchtitan.train.main`` (its Trainer, no objectives) with this
project's CPU runtime and local datasets, the reference the tests compare against."""

from titan_objectives.hosts.torchtitan_0_3.runtime import cpu as cpu_runtime


def main() -> None:
    cpu_runtime.activate()
    import torchtitan.train

    from titan_objectives.hosts.torchtitan_0_3.runtime.extensions import register_extensions

    register_extensions()
    torchtitan.train.main()
    cpu_runtime.exit_after_training()


if __name__ == "__main__":
    main()
