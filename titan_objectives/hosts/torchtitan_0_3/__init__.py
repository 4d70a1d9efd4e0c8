"""Everything that knows torchtitan 0.3.0's internals. Call ``runtime.cpu.activate()``
before anything imports torchtitan (``titan_objectives.train`` does)."""

from titan_objectives.hosts.torchtitan_0_3.seams import check_torchtitan_version

check_torchtitan_version()
