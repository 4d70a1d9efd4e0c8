"""examples/z_loss: a third-party objective package, installed with pip, trained by name."""

import math
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    ROOT,
    assert_gradients_within,
    assert_same_numbers,
    pip_install,
    scalars,
    train,
)
from tests.hosts.torchtitan_0_2.test_parallelism_e2e import (
    PROBE,
    run_from_one_seed,
)

EXAMPLE = ROOT / "examples" / "z_loss"
TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def z_loss_site(tmp_path_factory):
    return pip_install(EXAMPLE, tmp_path_factory.mktemp("z_loss_site"))


def test_z_loss_formula(z_loss_site, monkeypatch):
    monkeypatch.syspath_prepend(str(z_loss_site))
    from z_loss import ZLoss, ZLossOptions

    from titan_objectives import Features, ModelInfo

    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 2] = -100
    objective = ZLoss(ZLossOptions(coefficient=1e-2), ModelInfo(8, 2, 11, 5))
    out = objective(Features(labels=labels, logits=logits))
    expected = sum(
        1e-2 * math.log(sum(math.exp(v) for v in logits[b, t].tolist())) ** 2
        for b in range(2)
        for t in range(5)
        if labels[b, t] != -100
    )
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_z_loss_trains_through_its_entry_point(tmp_path, z_loss_site):
    result = train(
        tmp_path,
        "--objectives.stack",
        "ntp,z_loss",
        "--objectives.z_loss.coefficient",
        "1e-3",
        extra_pythonpath=str(z_loss_site),
    )
    assert "z_loss:" in result.stdout
    tb = scalars(tmp_path)
    log_z = tb["objectives/z_loss/log_z"]
    for step, loss in tb["objectives/z_loss/loss"].items():
        # At these logit scales log Z is nearly constant over tokens: loss ~ 1e-3 * mean(log Z)^2
        assert loss == pytest.approx(1e-3 * log_z[step] ** 2, rel=0.05)
    assert math.log(2048) - 1 < log_z[1] < math.log(2048) + 2  # ~log(vocab) at init


@pytest.mark.long
@pytest.mark.slow
def test_z_loss_under_tensor_parallel_matches_one_process(tmp_path, z_loss_site, twin_corpus):
    """z_loss reads vocabulary-sharded logits under loss parallel through
    ``titan_objectives.vocabulary``: losses, grad norm and whole gradients (step 1, before
    clipping) equal the single-process ones, loss parallel on and off."""
    common = (
        "--objectives.stack",
        "ntp,z_loss",
        "--objectives.z_loss.coefficient",
        "0.05",
        "--training.dataset_path",
        str(twin_corpus),
        "--training.steps",
        "3",
    )
    tp = ("--parallelism.tensor_parallel_degree", "2")
    logged = run_from_one_seed(
        tmp_path,
        common,
        {"tp": (2, tp), "tp_no_loss_parallel": (2, (*tp, "--parallelism.disable_loss_parallel"))},
        **{**PROBE, "extra_pythonpath": os.pathsep.join([str(z_loss_site), TESTS])},
    )
    tags = ("objectives/ntp/loss", "objectives/z_loss/loss", "objectives/z_loss/log_z", "grad_norm")
    assert_same_numbers(logged, tags, steps=3)
    # The z-loss is no rounding error here: 0.05 * log(Z)^2 is about half the ntp loss.
    assert (
        logged["one"]["objectives/z_loss/loss"][1] > 0.3 * logged["one"]["objectives/ntp/loss"][1]
    )
    assert_gradients_within(tmp_path, ["tp", "tp_no_loss_parallel"], 1e-4)


@pytest.fixture(scope="module")
def skip_token_site(tmp_path_factory):
    return pip_install(ROOT / "examples" / "skip_token", tmp_path_factory.mktemp("skip_site"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallelism",
    [(), ("--parallelism.tensor_parallel_degree", "2")],
    ids=["fsdp2", "tp2"],
)
def test_skip_token_under_fsdp2_and_tp_matches_one_process(skip_token_site, parallelism):
    """The second example plugin, installed with pip, through check-parallel: its loss and
    metrics-bearing run equal one process's under FSDP2 (2 ranks) and TP 2."""
    from tests.hosts.torchtitan_0_2.test_check_parallel import check_parallel, rows

    stack = ("--objectives.stack", "ntp,skip_token", "--objectives.skip_token.chunk_size", "64")
    result = check_parallel(skip_token_site, *stack, *parallelism)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    verdicts = rows(result.stdout)
    assert verdicts["objectives/skip_token/loss"] == "ok" and set(verdicts.values()) == {"ok"}
