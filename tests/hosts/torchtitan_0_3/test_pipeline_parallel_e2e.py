"""Pipeline parallelism (torchtitan 0.3, CPU, gloo): every objective scores each
micro-batch inside torchtitan's schedule on the last stage, the hidden states it reads from
earlier blocks carried there, and the run equals one process from one seed checkpoint."""

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.helpers import (
    assert_gradients_within,
    assert_same_numbers,
    expert_biases,
    pip_install,
    scalars,
)
from tests.hosts.torchtitan_0_3.test_config_and_plugins import PLUGIN
from tests.hosts.torchtitan_0_3.test_context_parallel_e2e import run_from_one_seed
from tests.hosts.torchtitan_0_3.test_train_e2e import train
from tests.parallel_runs import (
    CHUNKED_HEADS,
    FULL_STACK,
    MEASURE_GEOMETRY,
    OBJECTIVE_LOSSES,
    ONE_SEQUENCE_AT_A_TIME,
    PIPELINE_2,
    assert_geometry_of_the_first_micro_batch,
    pipeline_schedule,
)
from titan_objectives.hosts.common.checks import PIPELINE_SCHEDULES

pytestmark = [pytest.mark.slow, pytest.mark.long]

# 4 micro-batches of one sequence (the 0.3 CP tests' runner trains 3 steps of these sizes).
SIZES = ("--training.seq_len", "64", "--training.local_batch_size", "4")

STACK = (*FULL_STACK, *MEASURE_GEOMETRY)
TAGS = (*OBJECTIVE_LOSSES, "grad_norm")
VALIDATE = ("--validator.enable", "--validator.freq", "3", "--validator.steps", "1")
VALIDATED = tuple(f"validation/{tag}" for tag in OBJECTIVE_LOSSES)
# tyro's subcommand for the activation checkpointing policy (last on the command line).
FULL_AC = "activation_checkpoint:full"


def test_every_objective_under_every_schedule_matches_one_process(tmp_path):
    """ntp + nitp + mtp (D = 2) + top under PP 2 with 4 micro-batches, with each schedule
    the objectives run under, validating (but ZBV, which torch cannot evaluate): losses,
    grad norm, step 1's whole gradients, the geometry and validation equal one
    process's."""
    runs = {name: (2, pipeline_schedule(name)) for name in PIPELINE_SCHEDULES}
    # The zero-bubble ones recompute with full AC (selective: refused, preflight.py);
    # torch cannot evaluate under ZBV (SCHEDULES_WITHOUT_EVALUATION).
    runs["InterleavedZeroBubble"] = (2, (*pipeline_schedule("InterleavedZeroBubble"), FULL_AC))
    runs["ZBVZeroBubble"] = (
        2,
        (*pipeline_schedule("ZBVZeroBubble"), "--validator.no-enable", FULL_AC),
    )
    reference = {"one_accumulating": (1, ONE_SEQUENCE_AT_A_TIME)}
    common = ("llama3_debug", *STACK, *VALIDATE)
    logged = run_from_one_seed(tmp_path, common, {**runs, **reference}, sizes=SIZES)
    assert_same_numbers(logged, TAGS, steps=3)
    assert_gradients_within(tmp_path, list(runs), 1e-6)
    assert_geometry_of_the_first_micro_batch(logged, list(runs))
    for name in set(runs) - {"ZBVZeroBubble"}:
        for tag in VALIDATED:
            assert logged[name][tag][3] == pytest.approx(logged["one"][tag][3], rel=1e-5), tag


def test_pipeline_with_the_other_dimensions_matches_one_process(tmp_path, twin_corpus):
    """PP 2 (1F1B) x FSDP 2 and PP 2 x TP 2 (4 processes; each data-parallel rank reads
    its own copy of the corpus), PP 2 with compiled objectives (and the debug config's
    selective AC), PP 2 accumulating two batches of 2 micro-batches, and the heads'
    chunked cross-entropy under a zero-bubble schedule (its weight pass runs the
    backward again)."""
    common = ("llama3_debug", *STACK, "--dataloader.dataset_path", str(twin_corpus))
    accumulate = ("--training.local_batch_size", "2", "--training.global_batch_size", "4")
    one_f_one_b = pipeline_schedule("1F1B")  # 0.3's default is Interleaved1F1B
    fsdp = ("--parallelism.data_parallel_shard_degree", "2")
    runs = {
        "pp_fsdp": (4, (*one_f_one_b, *fsdp)),
        "pp_tp": (4, (*one_f_one_b, "--parallelism.tensor_parallel_degree", "2")),
        "pp_compiled": (2, (*one_f_one_b, "--compile.enable", "--compile.components", "loss")),
        "pp_accumulate": (2, (*one_f_one_b, *accumulate)),
        "pp_chunked_zero_bubble": (
            2,
            (*pipeline_schedule("InterleavedZeroBubble"), *CHUNKED_HEADS, FULL_AC),
        ),
    }
    reference = {"one_accumulating": (1, ONE_SEQUENCE_AT_A_TIME)}
    logged = run_from_one_seed(tmp_path, common, {**runs, **reference}, sizes=SIZES)
    assert_same_numbers(logged, TAGS, steps=3)
    assert_gradients_within(tmp_path, list(runs), 1e-6)
    assert_geometry_of_the_first_micro_batch(logged, list(runs))


def test_deepseek_v3_under_pipeline_parallel_matches_one_process(tmp_path, twin_corpus):
    """DeepSeek-V3 (MoE blocks, MTP's MoE block on the last stage, routers balanced) with
    ntp + nitp + mtp + top under PP 2: losses, grad norm, whole gradients at step 1 and,
    torch 2.14 restoring module buffers after the schedule's metadata inference, every
    router's bias after step 3 equal one process's."""
    common = ("deepseek_v3_debug", *STACK, "--dataloader.dataset_path", str(twin_corpus))
    logged = run_from_one_seed(tmp_path, common, {"pp": (2, PIPELINE_2)}, sizes=SIZES)
    assert_same_numbers(logged, TAGS, steps=3)
    assert_gradients_within(tmp_path, ["pp"], 1e-5)  # the experts' sums in another order
    reference = expert_biases(tmp_path / "one" / "checkpoint" / "step-3")
    assert reference["objectives.mtp.depths.0.block.moe.expert_bias_E"].abs().max() > 0
    biases = expert_biases(tmp_path / "pp" / "checkpoint" / "step-3")
    for key, value in reference.items():
        torch.testing.assert_close(biases[key], value, msg=key)


def test_plugins_under_pipeline_parallel_match_one_process(tmp_path, tmp_path_factory):
    """Plugins from another package: one training block 1's output (first stage, carried
    to the last) through the head (early_exit), one reading labels 3 ahead through the
    head (third_token), one reading hidden states 2 ahead (two_ahead_hidden)."""
    site = pip_install(PLUGIN, tmp_path_factory.mktemp("pp_plugin_site"))
    stack = "ntp,early_exit,third_token,two_ahead_hidden"
    common = ("llama3_debug", "--objectives.stack", stack)
    runs = {"pp": (2, pipeline_schedule("Interleaved1F1B"))}
    logged = run_from_one_seed(tmp_path, common, runs, sizes=SIZES, extra_pythonpath=str(site))
    tags = (
        "objectives/early_exit/loss",
        "objectives/third_token/loss",
        "objectives/two_ahead_hidden/loss",
        "grad_norm",
    )
    assert_same_numbers(logged, tags, steps=3)
    assert_gradients_within(tmp_path, ["pp"], 1e-6)


def test_resume_and_export_under_pipeline_parallel(tmp_path):
    """PP 2: a run resumed from its step 3 checkpoint (each stage's modules, the
    objectives' on the last) continues the uninterrupted one; the last checkpoint exports
    the plain model, computing what torchtitan's model loaded from it does."""
    from tests.export_checks import assert_transformers_computes
    from tests.hosts.torchtitan_0_3.test_export import built, flavor_config, logits, tokens_for
    from titan_objectives.cli import main

    run = (
        "llama3_debug",
        "--objectives.stack",
        "ntp,nitp,mtp",
        *SIZES,
        *PIPELINE_2,
        "--training.steps",
        "6",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "3",
        "--checkpoint.no-last_save_model_only",
    )
    train(tmp_path / "whole", *run, nproc=2)
    shutil.copytree(tmp_path / "whole" / "checkpoint", tmp_path / "resumed" / "checkpoint")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint" / "step-6")
    train(tmp_path / "resumed", *run, nproc=2)
    whole, resumed = scalars(tmp_path / "whole"), scalars(tmp_path / "resumed")
    for tag in ("objectives/ntp/loss", "objectives/nitp/loss", "objectives/mtp/loss"):
        assert sorted(resumed[tag]) == [4, 5, 6]
        for step in (4, 5, 6):
            assert resumed[tag][step] == pytest.approx(whole[tag][step], rel=1e-5), (tag, step)

    assert main(["export", str(tmp_path / "whole"), "--out", str(tmp_path / "hf")]) == 0
    config = flavor_config("llama3")
    state = built(config).state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "whole" / "checkpoint" / "step-6"))
    tokens = tokens_for(config)
    assert_transformers_computes(tmp_path / "hf", tokens, logits(built(config, state), tokens))
