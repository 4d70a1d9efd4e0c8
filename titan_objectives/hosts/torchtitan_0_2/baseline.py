"""``python -m titan_objectives.hosts.torchtitan_0_2.baseline --job.config_file CONFIG.toml``

torchtitan's own ``Trainer``, untouched, with only what this machine needs to run it (the
CPU runtime, the local datasets). It is the reference the objective trainer is compared
against: same config, same seed, plain torchtitan loss.
"""

from titan_objectives.hosts.torchtitan_0_2.runtime import cpu as cpu_runtime


def main() -> None:
    cpu_runtime.activate()

    import torchtitan.train

    from titan_objectives.hosts.torchtitan_0_2.runtime.extensions import register_extensions

    register_extensions()
    torchtitan.train.main(torchtitan.train.Trainer)
    cpu_runtime.exit_after_training()


if __name__ == "__main__":
    main()
