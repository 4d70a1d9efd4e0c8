"""What torchtitan 0.2.2 lacks to run here: the CPU runtime (``cpu``), local-file
datasets and research flavors (``extensions``). Kept apart from the trainer glue."""
