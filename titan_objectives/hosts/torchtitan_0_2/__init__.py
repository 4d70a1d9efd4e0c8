"""Everything that knows torchtitan 0.2.2's internals. Call ``runtime.cpu.activate()``
before anything imports torchtitan (``titan_objectives.train`` does)."""

from titan_objectives.hosts.torchtitan_0_2.seams import check_torchtitan_version

check_torchtitan_version()
