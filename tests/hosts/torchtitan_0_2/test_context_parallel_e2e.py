"""Context parallelism on CPU (torchtitan 0.2.2, gloo): torch's ring attention, given a
handler for the CPU SDPA kernel by the CPU runtime, makes a CP 2 run equal to one
process, from one seed checkpoint, with and without torchtitan's load balancing."""

from pathlib import Path

import pytest
import torch

from tests.helpers import assert_gradients_within, assert_same_numbers, expert_biases, pip_install
from tests.hosts.torchtitan_0_2.test_parallelism_e2e import (
    PROBE,
    VALIDATE_AT_STEP_3,
    run_from_one_seed,
)
from tests.parallel_runs import (
    CHUNKED_HEADS,
    FULL_STACK,
    MEASURE_GEOMETRY,
    OBJECTIVE_LOSSES,
    PAPER_RANK,
)

pytestmark = [pytest.mark.slow, pytest.mark.long]

CP = ("--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1")


@pytest.mark.parametrize("module", ["baseline", "objectives"])
def test_ntp_under_context_parallel_matches_one_process(tmp_path: Path, module: str):
    """Both CP ranks read the same batch (one data-parallel rank): each holds half of
    every sequence (the head and tail quarters with load balancing), attention crosses
    them by ring attention (keys and values all-gathered, or passed all-to-all); losses,
    grad norm and whole gradients equal one process's.
    ``baseline`` is torchtitan's own trainer, ``objectives`` the stack's (ntp)."""
    common = ("--objectives.stack", "ntp", "--training.steps", "3")
    runs = {
        "cp": (2, CP),
        "cp_no_balancing": (2, (*CP, "--parallelism.context_parallel_load_balancer", "None")),
        "cp_alltoall": (2, (*CP, "--parallelism.context_parallel_rotate_method", "alltoall")),
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
        assert_gradients_within(tmp_path, list(runs), 1e-6)


STACK = (*FULL_STACK, "--training.steps", "3")
MEASURED = (*MEASURE_GEOMETRY, *VALIDATE_AT_STEP_3)
TAGS = (*OBJECTIVE_LOSSES, "loss_metrics/global_avg_loss", "grad_norm")
# The NITP paper's effective rank: covariance moments of every token, summed over ranks (of
# one micro-batch: accumulating runs measure their first), PAPER_RANK.
VALIDATED = ("validation/objectives/nitp/loss", "validation/objectives/mtp/loss")


def test_every_objective_under_context_parallel_matches_one_process(tmp_path, twin_corpus):
    """ntp + nitp + mtp (D = 2) + top under CP 2 (load-balanced, and not; accumulating two
    micro-batches; with the heads' chunked cross-entropy; with compiled objectives and
    selective AC), CP 2 x FSDP 2 (each data-parallel rank reads its own copy of the
    corpus) and CP 2 x TP 2: labels and documents are shifted on the whole sequence, hidden states
    cross chunk edges, and the losses, grad norm, the paper's effective rank, validation
    losses and whole gradients equal one process's."""
    common = (*STACK, *MEASURED, "--training.dataset_path", str(twin_corpus))
    compiled = (
        "--compile.enable",
        "--compile.components",
        "loss",
        "--activation_checkpoint.mode",
        "selective",
    )
    accumulate = ("--training.local_batch_size", "2", "--training.global_batch_size", "4")
    runs = {
        "cp": (2, CP),
        "cp_no_balancing": (2, (*CP, "--parallelism.context_parallel_load_balancer", "None")),
        "cp_accumulate": (2, (*CP, *accumulate)),
        "cp_chunked": (2, (*CP, *CHUNKED_HEADS)),
        "cp_compiled": (2, (*CP, *compiled)),
        "cp_fsdp": (4, (*CP[:2], "--parallelism.data_parallel_shard_degree", "2")),
        "cp_tp": (4, (*CP, "--parallelism.tensor_parallel_degree", "2")),
    }
    logged = run_from_one_seed(tmp_path, common, runs, **PROBE)
    assert_same_numbers(logged, TAGS, steps=3)
    assert_same_numbers({k: v for k, v in logged.items() if k != "cp_accumulate"}, PAPER_RANK, 3)
    for tag in VALIDATED:  # validation under CP scores the whole sequences too
        # (not cp_fsdp: its data-parallel ranks validate on different documents)
        for name in set(logged) - {"cp_fsdp"}:
            run = logged[name]
            assert run[tag][3] == pytest.approx(logged["one"][tag][3], rel=1e-4), (name, tag)
    assert_gradients_within(tmp_path, list(runs), 1e-6)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    from tests.hosts.torchtitan_0_2.test_registry import PLUGIN

    return pip_install(PLUGIN, tmp_path_factory.mktemp("cp_plugin_site"))


def test_plugins_reading_ahead_under_context_parallel_match_one_process(tmp_path, plugin_site):
    """A plugin from another package that reads labels 3 positions ahead through the head
    (third_token), and one that reads hidden states 2 ahead (two_ahead_hidden), get the
    built-ins' treatment: their losses under CP 2 equal one process's."""
    common = ("--objectives.stack", "ntp,third_token,two_ahead_hidden", "--training.steps", "3")
    logged = run_from_one_seed(tmp_path, common, {"cp": (2, CP)}, extra_pythonpath=str(plugin_site))
    tags = ("objectives/third_token/loss", "objectives/two_ahead_hidden/loss", "grad_norm")
    assert_same_numbers(logged, tags, steps=3)


def test_deepseek_v3_under_context_parallel_matches_one_process(tmp_path, twin_corpus):
    """DeepSeek-V3 (MLA, whose values are narrower than its keys; MoE blocks, MTP's
    included, with their routers balanced) with ntp + nitp + mtp + top under CP 2: losses,
    grad norm, whole gradients and every router's bias equal one process's."""
    common = (
        "--model.name",
        "deepseek_v3",
        "--objectives.stack",
        "ntp,nitp,mtp,top",
        "--objectives.top.window",
        "8",
        "--training.seq_len",
        "32",
        "--training.local_batch_size",
        "2",
        "--training.dataset_path",
        str(twin_corpus),
        "--training.steps",
        "3",
        "--checkpoint.no-last_save_model_only",  # keep the routers' biases at the end
    )
    logged = run_from_one_seed(tmp_path, common, {"cp": (2, CP)}, **PROBE)
    assert_same_numbers(logged, (*TAGS[:4], "grad_norm"), steps=3)
    assert_gradients_within(tmp_path, ["cp"], 1e-6)
    reference = expert_biases(tmp_path / "one" / "ckpt" / "step-3")
    assert reference["objectives.mtp.depths.0.block.moe.expert_bias"].abs().max() > 0
    biases = expert_biases(tmp_path / "cp" / "ckpt" / "step-3")
    for key, value in reference.items():
        torch.testing.assert_close(biases[key], value, msg=key)
