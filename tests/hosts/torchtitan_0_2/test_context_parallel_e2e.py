"""Context parallelism on CPU (torchtitan 0.2.2, gloo): torch's ring attention, given a
handler for the CPU SDPA kernel by the CPU runtime, makes a CP 2 run equal to one
process, from one seed checkpoint, with and without torchtitan's load balancing."""

from pathlib import Path

import pytest

from tests.hosts.torchtitan_0_2.test_parallelism_e2e import (
    PROBE,
    assert_same_gradients,
    assert_same_numbers,
    run_from_one_seed,
)

pytestmark = [pytest.mark.slow, pytest.mark.long]

CP = ("--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1")


@pytest.mark.parametrize("module", ["baseline", "objectives"])
def test_ntp_under_context_parallel_matches_one_process(tmp_path: Path, module: str):
    """Both CP ranks read the same batch (one data-parallel rank): each holds half of
    every sequence (the head and tail quarters with load balancing), attention crosses
    them by ring attention; losses, grad norm and whole gradients equal one process's.
    ``baseline`` is torchtitan's own trainer, ``objectives`` the stack's (ntp)."""
    common = ("--objectives.stack", "ntp", "--training.steps", "3")
    runs = {
        "cp": (2, CP),
        "cp_no_balancing": (2, (*CP, "--parallelism.context_parallel_load_balancer", "None")),
    }
    if module == "baseline":
        kwargs = {"module": "titan_objectives.hosts.torchtitan_0_2.baseline"}
        tags = ("loss_metrics/global_avg_loss", "grad_norm")
    else:
        kwargs = PROBE
        tags = ("objectives/ntp/loss", "loss_metrics/global_avg_loss", "grad_norm")
    logged = run_from_one_seed(tmp_path, common, runs, **kwargs)
    assert "Applied Context Parallel to the model" in logged["cp"]["stdout"]
    assert_same_numbers(logged, tags, steps=3)
    if module == "objectives":
        assert_same_gradients(tmp_path, list(runs))
