"""What torchtitan 0.3.0 lacks to run here: the CPU runtime (``cpu``) and local-file
datasets (``datasets``). Kept apart from the trainer glue."""
