"""The torchtitan 0.2.2 host's tests: its CPU runtime is switched on before anything
imports torchtitan, and its datasets and flavors registered."""

from titan_objectives.hosts.torchtitan_0_2.runtime import cpu as cpu_runtime

cpu_runtime.activate()

from titan_objectives.hosts.torchtitan_0_2.runtime.extensions import (  # noqa: E402
    register_extensions,
)

register_extensions()
