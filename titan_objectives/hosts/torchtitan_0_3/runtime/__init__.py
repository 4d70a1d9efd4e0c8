"""What torchtitan 0.3.0 lacks to run here: the CPU runtime (``cpu``). Kept apart from the
trainer glue; the local datasets are shared with 0.2.2 (``hosts.common.corpus``)."""
