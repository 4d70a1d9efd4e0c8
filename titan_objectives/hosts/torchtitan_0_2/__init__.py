"""Everything that knows torchtitan 0.2.2's internals. Import ``cpu_runtime`` and call
``activate()`` before anything imports torchtitan (``titan_objectives.train`` does)."""

from titan_objectives.hosts.torchtitan_0_2.seams import check_torchtitan_version

check_torchtitan_version()
