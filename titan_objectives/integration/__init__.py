"""Everything that knows torchtitan's internals. Import ``cpu_runtime`` and call
``activate()`` before anything imports torchtitan (``titan_objectives.train`` does)."""
