"""Real torchtitan trainings on CPU (gloo), at tiny sizes."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from tests.helpers import ROOT, TINY, pip_install, scalars, train

pytestmark = pytest.mark.slow

NTP_CONFIG_OVERRIDES = ("--objectives.stack", "ntp")


def test_ntp_stack_matches_plain_torchtitan_bitwise(tmp_path):
    ours = tmp_path / "ours"
    plain = tmp_path / "plain"
    train(ours, *NTP_CONFIG_OVERRIDES, "--training.steps", "6")
    train(
        plain,
        *NTP_CONFIG_OVERRIDES,
        "--training.steps",
        "6",
        module="titan_objectives.hosts.torchtitan_0_2.baseline",
    )
    ours_tb, plain_tb = scalars(ours), scalars(plain)
    expected = plain_tb["loss_metrics/global_avg_loss"]
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert ours_tb["loss_metrics/global_avg_loss"] == expected
    assert ours_tb["grad_norm"] == plain_tb["grad_norm"]
    assert ours_tb["objectives/ntp/loss"] == expected
    assert "objectives/ntp/loss" not in plain_tb


def check_ntp_nitp_run(dump_folder, steps=5):
    tb = scalars(dump_folder)
    for tag in (
        "objectives/ntp/loss",
        "objectives/nitp/loss",
        "objectives/nitp/cosine",
        "objectives/nitp/weight",
        "objectives/total/loss",
    ):
        assert sorted(tb[tag]) == list(range(1, steps + 1)), tag
    for step in tb["objectives/total/loss"]:
        ntp, nitp = tb["objectives/ntp/loss"][step], tb["objectives/nitp/loss"][step]
        assert math.isfinite(ntp) and 0 < nitp <= 2.0
        weight = tb["objectives/nitp/weight"][step]
        assert tb["objectives/total/loss"][step] == pytest.approx(ntp + weight * nitp, rel=1e-5)
        # torchtitan's own loss is the weighted total the objectives report.
        assert tb["loss_metrics/global_avg_loss"][step] == pytest.approx(
            ntp + weight * nitp, rel=1e-5
        )
    return tb


def test_ntp_nitp_single_process_with_checkpoint(tmp_path):
    result = train(
        tmp_path,
        "--objectives.nitp.weight",
        "0.8",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "5",
        "--checkpoint.folder",
        "checkpoint",
        "--checkpoint.no-last_save_model_only",
    )
    tb = check_ntp_nitp_run(tmp_path)
    assert list(tb["objectives/nitp/weight"].values()) == pytest.approx([0.8] * 5)
    assert "objectives  ntp:" in result.stdout and "nitp:" in result.stdout
    # The projector is part of the model: training checkpoints hold it.
    metadata = (tmp_path / "checkpoint" / "step-5" / ".metadata").read_bytes()
    assert b"objectives.nitp.projector.w1.weight" in metadata
    assert b"objectives.nitp.projector.w2.weight" in metadata


FULL_STACK = (
    "--objectives.stack",
    "ntp,nitp,mtp",
    "--objectives.mtp.depth",
    "2",
    "--objectives.ntp.chunk_size",
    "48",
    "--objectives.mtp.chunk_size",
    "48",
)
STACK_TAGS = (
    "objectives/ntp/loss",
    "objectives/nitp/loss",
    "objectives/mtp/depth_1",
    "objectives/mtp/depth_2",
)


def test_full_stack_activation_checkpointing(tmp_path):
    train(tmp_path / "plain", *FULL_STACK, "--training.steps", "3")
    plain_tb = scalars(tmp_path / "plain")
    for mode in ("selective", "full"):
        ac = train(
            tmp_path / mode,
            *FULL_STACK,
            "--activation_checkpoint.mode",
            mode,
            "--training.steps",
            "3",
        )
        assert f"Applied {mode} activation checkpointing" in ac.stdout
        assert "Objectives recompute their activations in backward" in ac.stdout
        # Recomputation (the MTP blocks' included) changes no number.
        ac_tb = check_mtp_run(tmp_path / mode, 3)
        for tag in STACK_TAGS:
            for step, value in plain_tb[tag].items():
                assert ac_tb[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (mode, tag)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    batch = ("--training.global_batch_size", "4", "--training.steps", "3")
    train(tmp_path / "big", *FULL_STACK, *batch, "--training.local_batch_size", "4")
    train(tmp_path / "accum", *FULL_STACK, *batch, "--training.local_batch_size", "2")
    big, accum = check_mtp_run(tmp_path / "big", 3), check_mtp_run(tmp_path / "accum", 3)
    # Same 4 sequences per step, summed in a different order: equal up to fp32 rounding.
    for tag in (*STACK_TAGS, "grad_norm"):
        for step, value in big[tag].items():
            assert accum[tag][step] == pytest.approx(value, rel=2e-5), (tag, step)


@pytest.mark.parametrize("ngpu", [1, 2])
def test_run_train_script(tmp_path, ngpu):
    """The launcher, as a user runs it: default CONFIG_FILE, extra args passed through."""
    env = dict(os.environ, NGPU=str(ngpu), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            str(ROOT / "scripts" / "run_train.sh"),
            "--job.dump_folder",
            str(tmp_path),
            *TINY,
            "--training.steps",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"dp_shard={ngpu}" in result.stdout
    if ngpu == 2:
        assert "Applied FSDP to the objectives, one unit each: nitp" in result.stdout
    check_ntp_nitp_run(tmp_path, steps=2)


def test_run_train_script_trains_the_config_named_as_an_argument(tmp_path):
    """torchtitan trains the first --job.config_file it sees: the script must pass the
    user's, not its default, and refuse two different ones."""
    script = str(ROOT / "scripts" / "run_train.sh")
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", NGPU="1")
    named = "toml_configs/llama3_debug_stack.toml"  # ntp + nitp + mtp; the default has no mtp
    result = subprocess.run(
        [
            script,
            f"--job.config_file={named}",
            "--job.dump_folder",
            str(tmp_path),
            *TINY,
            "--training.steps",
            "1",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "objectives/mtp/loss" in scalars(tmp_path)
    both = subprocess.run(
        [script, "--job.config_file", named],
        env=dict(env, CONFIG_FILE="toml_configs/llama3_debug_ntp.toml"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert both.returncode == 2
    assert "name two different configs; give one" in both.stderr
    # The same file spelled two ways is one config (a launcher that exits 0 stands in).
    same = subprocess.run(
        [script, "--job.config_file", named],
        env=dict(env, CONFIG_FILE=f"./{named}", PYTHON="/bin/true"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert same.returncode == 0, same.stderr
    empty = subprocess.run(
        [script, "--job.config_file="],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert empty.returncode == 2 and "--job.config_file= needs a path" in empty.stderr


def check_mtp_run(dump_folder, steps, depth=2, weight=0.3):
    tb = scalars(dump_folder)
    for k in range(1, depth + 1):
        assert sorted(tb[f"objectives/mtp/depth_{k}"]) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        depths = [tb[f"objectives/mtp/depth_{k}"][step] for k in range(1, depth + 1)]
        assert all(math.isfinite(ce) and ce > 0 for ce in depths)
        assert tb["objectives/mtp/weight"][step] == pytest.approx(weight)
        total = sum(
            tb[f"objectives/{name}/weight"][step] * tb[f"objectives/{name}/loss"][step]
            for name in ("ntp", "nitp", "mtp")
            if f"objectives/{name}/loss" in tb
        )
        assert tb["loss_metrics/global_avg_loss"][step] == pytest.approx(total, rel=1e-5)
    return tb


def test_ntp_mtp_single_process(tmp_path):
    train(tmp_path, "--objectives.stack", "ntp,mtp", "--objectives.mtp.depth", "2")
    check_mtp_run(tmp_path, steps=5)


@pytest.mark.parametrize("nproc", [1, 2])
def test_full_stack_compiled(tmp_path, nproc):
    result = train(tmp_path, *FULL_STACK, "--compile.enable", "--training.steps", "3", nproc=nproc)
    assert "Parallelized 2 objective block(s) like the model's own" in result.stdout
    assert "Compiling objectives with torch.compile: ntp, nitp, mtp" in result.stdout
    assert f"dp_shard={nproc}" in result.stdout
    check_mtp_run(tmp_path, steps=3)


def test_parallel_mtp_with_recomputed_heads_and_step_schedule(tmp_path):
    train(
        tmp_path,
        "--objectives.stack",
        "ntp,mtp",
        "--objectives.mtp.variant",
        "parallel",
        "--objectives.mtp.depth",
        "2",
        "--objectives.mtp.recompute_heads",
        "--objectives.mtp.schedule",
        "step",
        "--objectives.mtp.switch_step",
        "3",
        "--objectives.mtp.weight_after",
        "0.1",
        "--training.steps",
        "4",
    )
    tb = scalars(tmp_path)
    assert [tb["objectives/mtp/weight"][s] for s in (1, 2, 3, 4)] == pytest.approx(
        [0.3, 0.3, 0.1, 0.1]
    )


@pytest.fixture(scope="module")
def nan_plugin(tmp_path_factory):
    from tests.hosts.torchtitan_0_2.test_registry import PLUGIN

    return pip_install(PLUGIN, tmp_path_factory.mktemp("nan_site"))


PIPELINE = (
    "--parallelism.pipeline_parallel_degree",
    "2",
    "--parallelism.data_parallel_shard_degree",
    "1",
)


@pytest.mark.parametrize(("nproc", "parallelism"), [(1, ()), (2, PIPELINE)])
def test_a_nan_loss_stops_training_naming_objective_and_step(
    tmp_path, nan_plugin, nproc, parallelism
):
    """Under PP the last stage scores and every stage stops with it (rank 0 reports)."""
    result = train(
        tmp_path,
        "--objectives.stack",
        "ntp,nan_probe",
        "--objectives.nan_probe.weight",
        "0.5",
        *parallelism,
        nproc=nproc,
        extra_pythonpath=str(nan_plugin),
        check=False,
    )
    if nproc == 1:
        assert result.returncode == 3, result.stdout[-3000:]
    else:  # torchrun exits 1 when its workers fail; each worker exits 3
        assert result.returncode == 1 and "exitcode  : 3" in result.stdout, result.stdout[-3000:]
    assert "step 1: the loss of nan_probe is not finite (NaN or inf)" in result.stdout
    assert "the optimizer did not apply it, and training stopped at step 1" in result.stdout


def test_nan_steps_can_be_skipped(tmp_path, nan_plugin):
    result = train(
        tmp_path,
        "--objectives.stack",
        "ntp,nan_probe",
        "--objectives.nonfinite",
        "skip",
        "--training.steps",
        "3",
        extra_pythonpath=str(nan_plugin),
    )
    for step in (1, 2, 3):
        assert f"step {step}: the loss of nan_probe is not finite" in result.stdout
    assert result.stdout.count("the optimizer skipped those steps") == 3


def test_a_nan_step_is_skipped_on_the_device_and_reported_at_the_next_log_step(
    tmp_path, nan_plugin
):
    """Fused AdamW skips the step itself (no host read on steps that are not logged): the
    NaN at step 3 is reported after step 4's metrics, and Adam counted 3 steps, not 4."""
    result = train(
        tmp_path,
        "--objectives.stack",
        "ntp,nan_probe",
        "--objectives.nan_probe.at_call",
        "3",
        "--objectives.nonfinite",
        "skip",
        "--training.steps",
        "4",
        "--metrics.log_freq",
        "2",
        "--checkpoint.enable",
        "--checkpoint.folder",
        "ckpt",
        "--checkpoint.interval",
        "4",
        "--checkpoint.no-last_save_model_only",
        extra_pythonpath=str(nan_plugin),
    )
    warning = "step 3: the loss of nan_probe is not finite (NaN or inf); the optimizer skipped"
    assert result.stdout.count(warning) == 1
    assert result.stdout.index(warning) > result.stdout.index("step:  4")
    metadata = FileSystemReader(str(tmp_path / "ckpt" / "step-4")).read_metadata()
    key = "optimizer.state.tok_embeddings.weight.step"
    assert key in metadata.state_dict_metadata
    state = {key: torch.zeros(())}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt" / "step-4"))
    assert state[key].item() == 3.0


@pytest.mark.long
def test_compare_objectives_script_reports_losses_and_downstream_scores(tmp_path):
    """scripts/experiments/compare_objectives.sh at its CPU size: one run per stack, each
    saved, exported and scored by lm-eval, one report with both tables."""
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        NGPU="1",
        TINY="1",
        STACKS="ntp ntp,nitp",
        STEPS="3",
        TASKS="tangled_tale_cloze",
        LIMIT="3",
        OUT=str(tmp_path),
    )
    script = ROOT / "scripts" / "experiments" / "compare_objectives.sh"
    result = subprocess.run(
        [str(script), "--training.seq_len", "64", "--validation.seq_len", "64"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    losses, scores = (tmp_path / "report" / "summary.md").read_text().split("# Downstream")
    assert "objectives/nitp/loss" in losses
    rows = [line.split(" | ")[0] for line in scores.splitlines() if line.startswith("| ntp")]
    assert rows == ["| ntp", "| ntp_nitp"]
    for run in ("ntp", "ntp_nitp"):
        assert (tmp_path / run / "hf" / "step-3" / "config.json").is_file()
