"""Context parallelism on CPU (torchtitan 0.3, gloo): its FlexAttention context parallel
(keys and values all-gathered) on the CPU runtime, and every objective under it, equal
one process from one seed checkpoint."""

import shutil
from pathlib import Path

import pytest

from tests.helpers import scalars
from tests.hosts.torchtitan_0_3.test_train_e2e import first_moments, train

pytestmark = [pytest.mark.slow, pytest.mark.long]

# FlexAttention's context parallel splits whole mask blocks of 128 positions per rank.
SIZES = ("--training.seq_len", "256", "--training.local_batch_size", "2")
CP = ("--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1")
CHECKPOINTS = (
    "--checkpoint.enable",
    "--checkpoint.interval",
    "100",
    "--checkpoint.no-last_save_model_only",
)
MODEL = (
    "tok_embeddings.weight",
    "layers.0.attention.qkv_linear.wqkv.weight",
    "norm.weight",
    "lm_head.weight",
)


def assert_runs_match_one_process(
    folder: Path, common: tuple, runs: dict, tags: tuple, parameters: tuple
) -> None:
    """Train ``one`` (1 process) and each of ``runs`` 3 steps from one seed checkpoint:
    ``tags`` within 1e-4 relative, Adam's first moments of ``parameters`` after step 3
    within 1e-4 of their largest entry (fp32 drift of the steps' reduction orders, the
    grad norm's included, which clipping applies to every parameter alike)."""
    train(folder / "seed", *common, "--checkpoint.create_seed_checkpoint")
    logged = {}
    for name, (nproc, overrides) in {"one": (1, ()), **runs}.items():
        shutil.copytree(folder / "seed" / "checkpoint", folder / name / "checkpoint")
        train(folder / name, *common, *overrides, nproc=nproc)
        logged[name] = scalars(folder / name)
    expected = first_moments(folder / "one" / "checkpoint" / "step-3", parameters)
    for name in runs:
        worst = max(
            abs(logged[name][tag][step] / logged["one"][tag][step] - 1)
            for tag in tags
            for step in (1, 2, 3)
        )
        print(f"{name}: largest relative difference from one process {worst:.1e}")
        assert worst < 1e-4, name
        moments = first_moments(folder / name / "checkpoint" / "step-3", parameters)
        for key, value in expected.items():
            scale = value.abs().max().item()
            difference = (moments[key] - value).abs().max().item() / scale
            print(f"{name} {key}: largest difference / largest entry {difference:.1e}")
            assert difference < 1e-4, (name, key)


def test_ntp_under_context_parallel_matches_one_process(tmp_path):
    common = ("llama3_debug", "--objectives.stack", "ntp", *SIZES, "--training.steps", "3")
    runs = {
        "cp": (2, CP),
        "cp_no_balancing": (2, (*CP, "--parallelism.context_parallel_load_balancer", "None")),
    }
    tags = ("objectives/ntp/loss", "loss_metrics/global_avg_loss", "grad_norm")
    assert_runs_match_one_process(tmp_path, (*common, *CHECKPOINTS), runs, tags, MODEL)


def test_every_objective_under_context_parallel_matches_one_process(tmp_path, twin_corpus):
    """ntp + nitp + mtp (D = 2) + top, FlexAttention with block-causal masks (documents
    found on the whole sequence), the debug config's selective AC, under CP 2 (also with
    compiled objectives, and accumulating two micro-batches), CP 2 x FSDP 2 and CP 2 x TP 2
    (each data-parallel rank reads its own copy of the corpus)."""
    common = (
        "llama3_debug",
        "--objectives.stack",
        "ntp,nitp,mtp,top",
        "--objectives.mtp.depth",
        "2",
        "--objectives.top.window",
        "8",
        "--dataloader.dataset_path",
        str(twin_corpus),
        *SIZES,
        "--training.steps",
        "3",
        *CHECKPOINTS,
    )
    accumulate = ("--training.local_batch_size", "1", "--training.global_batch_size", "2")
    runs = {
        "cp": (2, CP),
        "cp_compiled": (2, (*CP, "--compile.enable", "--compile.components", "loss")),
        "cp_accumulate": (2, (*CP, *accumulate)),
        "cp_fsdp": (4, (*CP[:2], "--parallelism.data_parallel_shard_degree", "2")),
        "cp_tp": (4, (*CP, "--parallelism.tensor_parallel_degree", "2")),
    }
    tags = (
        "objectives/ntp/loss",
        "objectives/nitp/loss",
        "objectives/mtp/loss",
        "objectives/top/loss",
        "grad_norm",
    )
    objectives = (
        "objectives.nitp.projector.w1.weight",
        "objectives.mtp.depths.0.projection.weight",
        "objectives.top.head.weight",
    )
    assert_runs_match_one_process(tmp_path, common, runs, tags, (*MODEL, *objectives))
