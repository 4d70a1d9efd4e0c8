"""Flags and checks the pipeline- and context-parallel tests of both hosts share (both
torchtitan releases name these settings alike)."""

from tests.helpers import assert_same_numbers

# ntp + nitp + mtp (D = 2) + top: every kind of requirement (labels ahead, hidden states
# ahead, a middle layer, the embeddings, the head).
FULL_STACK = (
    "--objectives.stack",
    "ntp,nitp,mtp,top",
    "--objectives.mtp.depth",
    "2",
    "--objectives.top.window",
    "8",
)
OBJECTIVE_LOSSES = (
    "objectives/ntp/loss",
    "objectives/nitp/loss",
    "objectives/mtp/loss",
    "objectives/top/loss",
)
# The NITP paper's effective rank of the final hidden states and of block 2's.
MEASURE_GEOMETRY = ("--objectives.geometry.freq", "1", "--objectives.geometry.layers", "2")
PAPER_RANK = ("geometry/final/effective_rank", "geometry/layer_2/effective_rank")
# The heads' chunked cross-entropy (its gradients made in the forward).
CHUNKED_HEADS = (
    "--objectives.ntp.chunk_size",
    "48",
    "--objectives.mtp.chunk_size",
    "40",
    "--objectives.top.chunk_size",
    "48",
)
# One process accumulating micro-batches of one sequence: the geometry's reference under
# PP, which measures a step's first micro-batch.
ONE_SEQUENCE_AT_A_TIME = ("--training.local_batch_size", "1", "--training.global_batch_size", "4")
PIPELINE_2 = (
    "--parallelism.pipeline_parallel_degree",
    "2",
    "--parallelism.data_parallel_shard_degree",
    "1",
)


def pipeline_schedule(name: str) -> tuple[str, ...]:
    """PP 2 with the schedule ``name``."""
    return (*PIPELINE_2, "--parallelism.pipeline_parallel_schedule", name)


def assert_geometry_of_the_first_micro_batch(logged: dict, runs: list[str]) -> None:
    """The runs' effective ranks equal those of ``one_accumulating`` (one process,
    ``ONE_SEQUENCE_AT_A_TIME``), over 3 steps."""
    reference = {"one": logged["one_accumulating"]}
    assert_same_numbers({**reference, **{name: logged[name] for name in runs}}, PAPER_RANK, 3)
