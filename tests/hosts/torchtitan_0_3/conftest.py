"""The torchtitan 0.3 host's tests (``TORCHTITAN=0.3 ./scripts/test.sh``): its CPU runtime
is switched on before anything imports torchtitan."""

from titan_objectives.hosts.torchtitan_0_3.runtime import cpu as cpu_runtime

cpu_runtime.activate()
