"""What torchtitan 0.2.2 lacks to run here: the CPU runtime (``cpu``), and local-file
datasets (``hosts.common.corpus``) and research flavors, registered by ``extensions``.
Kept apart from the trainer glue."""
