"""Real torchtitan trainings on CPU (gloo), at tiny sizes."""

import math
import os
import subprocess
import sys

import pytest
from helpers import ROOT, TINY, scalars, train

pytestmark = pytest.mark.slow

NTP_CONFIG_OVERRIDES = ("--objectives.stack", "ntp")


def test_ntp_stack_matches_plain_torchtitan_bitwise(tmp_path):
    ours = tmp_path / "ours"
    plain = tmp_path / "plain"
    train(ours, *NTP_CONFIG_OVERRIDES, "--training.steps", "6")
    train(plain, *NTP_CONFIG_OVERRIDES, "--training.steps", "6", module="titan_objectives.baseline")
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
    )
    tb = check_ntp_nitp_run(tmp_path)
    assert list(tb["objectives/nitp/weight"].values()) == pytest.approx([0.8] * 5)
    assert "objectives  ntp:" in result.stdout and "nitp:" in result.stdout
    # The projector is part of the model: checkpointed with it.
    metadata = (tmp_path / "checkpoint" / "step-5" / ".metadata").read_bytes()
    assert b"objectives.nitp.projector.w1.weight" in metadata
    assert b"objectives.nitp.projector.w2.weight" in metadata


def test_ntp_nitp_fsdp_two_processes(tmp_path):
    result = train(tmp_path, nproc=2)
    assert "dp_shard=2" in result.stdout
    check_ntp_nitp_run(tmp_path)


def test_ntp_nitp_compiled(tmp_path):
    result = train(tmp_path, "--compile.enable", "--training.steps", "3")
    assert "Compiling objectives with torch.compile: ntp, nitp" in result.stdout
    check_ntp_nitp_run(tmp_path, steps=3)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_ntp_nitp_activation_checkpointing(tmp_path, mode):
    ac = train(tmp_path / "ac", "--activation_checkpoint.mode", mode, "--training.steps", "3")
    assert f"Applied {mode} activation checkpointing" in ac.stdout
    plain = train(tmp_path / "plain", "--training.steps", "3")
    # Recomputation changes no number.
    ac_tb, plain_tb = check_ntp_nitp_run(tmp_path / "ac", 3), scalars(tmp_path / "plain")
    for tag in ("objectives/ntp/loss", "objectives/nitp/loss"):
        for step, value in plain_tb[tag].items():
            assert ac_tb[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (tag, step)
    assert plain.returncode == 0


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    train(
        tmp_path / "big",
        "--training.local_batch_size",
        "4",
        "--training.global_batch_size",
        "4",
        "--training.steps",
        "3",
    )
    train(
        tmp_path / "accum",
        "--training.local_batch_size",
        "2",
        "--training.global_batch_size",
        "4",
        "--training.steps",
        "3",
    )
    big, accum = check_ntp_nitp_run(tmp_path / "big", 3), check_ntp_nitp_run(tmp_path / "accum", 3)
    # Same 4 sequences per step, summed in a different order: equal up to fp32 rounding.
    for tag in (
        "objectives/ntp/loss",
        "objectives/nitp/loss",
        "objectives/nitp/cosine",
        "grad_norm",
    ):
        for step, value in big[tag].items():
            assert accum[tag][step] == pytest.approx(value, rel=2e-5), (tag, step)


@pytest.mark.parametrize("ngpu", [1, 2])
def test_run_train_script(tmp_path, ngpu):
    """The launcher, as a user runs it: default CONFIG_FILE, extra args passed through."""
    env = dict(os.environ, NGPU=str(ngpu), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(ROOT / "scripts" / "run_train.sh"), "--job.dump_folder", str(tmp_path), *TINY,
         "--training.steps", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"dp_shard={ngpu}" in result.stdout
    tb = scalars(tmp_path)
    assert sorted(tb["objectives/nitp/loss"]) == [1, 2]
