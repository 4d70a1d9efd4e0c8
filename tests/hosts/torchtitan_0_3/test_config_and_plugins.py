"""Config errors, the TOML table, seams, and a plugin's non-finite loss on the 0.3 host."""

import inspect
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, assert_seam_exists_and_is_used, pip_install, torchrun
from titan_objectives.config import ObjectivesConfigError
from titan_objectives.hosts.torchtitan_0_3.launch import parse_config
from titan_objectives.hosts.torchtitan_0_3.preflight import check_config
from titan_objectives.hosts.torchtitan_0_3.seams import PRIVATE_SEAMS
from titan_objectives.hosts.torchtitan_0_3.trainer import NON_FINITE_STOP

OURS = ["--module", "titan_objectives.hosts.torchtitan_0_3", "--config", "llama3_debug"]
PLUGIN = ROOT / "tests" / "plugin_fixture"


@pytest.mark.parametrize(("module", "attribute", "user", "why"), PRIVATE_SEAMS)
def test_every_private_seam_still_exists_and_is_used_where_listed(module, attribute, user, why):
    assert_seam_exists_and_is_used("torchtitan_0_3", module, attribute, user)


def test_torchtitan_still_stops_on_a_non_finite_loss_with_the_message_we_catch():
    import torchtitan.trainer

    assert f'f"{NON_FINITE_STOP} (' in inspect.getsource(torchtitan.trainer.Trainer.train_step)


def test_objectives_flags_and_the_toml_table_reach_the_config(tmp_path):
    toml = tmp_path / "objectives.toml"
    toml.write_text('[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\nweight = 0.5\n')
    config = parse_config(
        [*OURS, "--objectives.toml", str(toml), "--objectives.nitp.target_layer", "3"]
    )
    assert config.objectives.stack == ["ntp", "nitp"]
    assert (config.objectives.nitp.weight, config.objectives.nitp.target_layer) == (0.5, 3)
    # torchtitan's own config functions are wrapped
    wrapped = parse_config(
        ["--module", "llama3", "--config", "llama3_debugmodel", "--objectives.stack", "ntp,mtp"]
    )
    assert wrapped.objectives.stack == ["ntp", "mtp"]
    assert wrapped.parallelism.spmd_backend == "partial_dtensor"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objectives.stack", "ntp,nitpp"], "objectives.stack: unknown objective 'nitpp'"),
        (
            ["--objectives.nitp.target_layer", "9", "--objectives.stack", "ntp,nitp"],
            "objectives.nitp.target_layer = 9",
        ),
        (["--parallelism.spmd_backend", "spmd_types"], "parallelism.spmd_backend = 'spmd_types'"),
        (["--checkpoint.create_seed_checkpoint"], "pass --checkpoint.enable"),
        (
            ["--objectives.stack", "ntp", "--parallelism.context_parallel_degree", "2"]
            + ["--training.seq_len", "64"],
            "training.seq_len = 64 with parallelism.context_parallel_degree = 2: context "
            "parallelism cuts each sequence into 4 chunks (two per rank, load-balanced), each "
            "rank's share whole 128-position mask blocks; use a seq_len divisible by 256",
        ),
        (
            ["--objectives.stack", "ntp,nitp", "--parallelism.pipeline_parallel_degree", "2"]
            + ["--parallelism.pipeline_parallel_schedule", "InterleavedZeroBubble"],
            "activation_checkpoint:selective with parallelism.pipeline_parallel_schedule = "
            "'InterleavedZeroBubble': torch's selective activation checkpointing allows one "
            "backward per checkpointed region",
        ),
        (
            ["--objectives.stack", "ntp,mtp", "--parallelism.pipeline_parallel_degree", "2"]
            + ["--training.local_batch_size", "1"],
            "training.local_batch_size = 1 with parallelism.pipeline_parallel_microbatch_size "
            "= 1 gives 1 micro-batches for 4 pipeline stages (Interleaved1F1B)",
        ),
        (
            ["--objectives.stack", "ntp", "--parallelism.pipeline_parallel_degree", "2"]
            + ["--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble", "--validator.enable"]
            + ["activation_checkpoint:none"],
            "validator.enable with parallelism.pipeline_parallel_schedule = 'ZBVZeroBubble'",
        ),
    ],
)
def test_bad_config_is_named_before_anything_is_built(args, message):
    with pytest.raises(ObjectivesConfigError, match=re.escape(message)):
        check_config(parse_config([*OURS, *args]))


def test_the_command_line_exits_2_with_the_message_before_building():
    result = subprocess.run(
        [sys.executable, "-m", "titan_objectives.train", *OURS, "--objectives.toml", "no.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "config error: --objectives.toml 'no.toml' does not exist" in result.stderr
    assert "Building llama3" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """tiny_plugin, installed by pip into a folder (put on PYTHONPATH)."""
    return pip_install(PLUGIN, tmp_path_factory.mktemp("plugin_site"))


@pytest.mark.slow
def test_a_plugins_nan_loss_stops_or_is_skipped(tmp_path, installed_plugin):
    """A plugin from another package (entry point) trains on 0.3 like a built-in: a NaN
    loss stops training naming it and the step (under PP too), or, with nonfinite =
    'skip', each such step is skipped and training goes on."""
    common = [
        "titan_objectives.train",
        *OURS,
        "--objectives.stack",
        "ntp,nan_probe",
        "--training.seq_len",
        "64",
        "--training.local_batch_size",
        "2",
        "--metrics.log_freq",
        "1",
    ]
    stop = torchrun(
        [*common, "--dump_folder", str(tmp_path / "a")],
        extra_pythonpath=str(installed_plugin),
        check=False,
    )
    assert stop.returncode == 3, stop.stdout[-3000:]
    assert "step 1: the loss of nan_probe is not finite (NaN or inf)" in stop.stdout
    skip_args = [
        "--dump_folder",
        str(tmp_path / "b"),
        "--training.steps",
        "3",
        "--objectives.nonfinite",
        "skip",
    ]
    skip = torchrun([*common, *skip_args], extra_pythonpath=str(installed_plugin))
    assert skip.stdout.count("the optimizer skipped those steps") == 3
    # Under PP the last stage scores, and every stage stops with it (rank 0 reports).
    pipeline = ["--parallelism.pipeline_parallel_degree", "2", "--dump_folder", str(tmp_path / "c")]
    one_stage_per_rank = ["--parallelism.pipeline_parallel_schedule", "1F1B"]
    stop = torchrun(
        [*common, *pipeline, *one_stage_per_rank, "--parallelism.data_parallel_shard_degree", "1"],
        nproc=2,
        extra_pythonpath=str(installed_plugin),
        check=False,
    )
    # torchrun exits 1 when its workers fail; each worker exits 3, as one process does.
    assert stop.returncode == 1 and "exitcode  : 3" in stop.stdout, stop.stdout[-3000:]
    assert "step 1: the loss of nan_probe is not finite (NaN or inf)" in stop.stdout


def test_objective_blocks_are_built_after_the_configs_overrides():
    override = "tests.hosts.torchtitan_0_3.override_fixture.wider_feed_forward"
    args = [*OURS, "--objectives.stack", "ntp,mtp", "--override.imports", override]
    checked = check_config(parse_config(args))
    block = checked.stack["mtp"].depths[0].block
    assert block.feed_forward.w1.weight.shape == (512, 256)
    plain = check_config(parse_config([*OURS, "--objectives.stack", "ntp,mtp"]))
    assert plain.stack["mtp"].depths[0].block.feed_forward.w1.weight.shape == (768, 256)


def test_a_trainer_subclass_runs_through_train_main(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.hosts.torchtitan_0_3.trainer_probe",
            *OURS,
            "--objectives.stack",
            "ntp,nitp",
            "--dump_folder",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(
            os.environ,
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="localhost",
            MASTER_PORT="0",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built ReportOnly with ntp, nitp" in result.stdout
