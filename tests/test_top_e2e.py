"""TOP in real torchtitan runs (CPU, gloo): training on the main job's data, and the same
numbers under FSDP2, TP 2 (the TOP head split over the vocabulary) with a compiled loss
and activation checkpointing, as on one process."""

import pytest
from helpers import scalars, train
from test_parallelism_e2e import (
    PROBE,
    TP,
    assert_same_gradients,
    assert_same_numbers,
    run_from_one_seed,
)

pytestmark = pytest.mark.slow


def test_ntp_top_trains_on_the_main_jobs_data_with_both_losses_falling(tmp_path):
    result = train(
        tmp_path, "--objectives.stack", "ntp,top", "--objectives.top.window", "32",
        "--training.steps", "12", "--lr_scheduler.warmup_steps", "3",
    )  # fmt: skip
    assert "top:" in result.stdout
    tb = scalars(tmp_path)
    for name in ("ntp", "top"):
        losses = tb[f"objectives/{name}/loss"]
        assert sorted(losses) == list(range(1, 13))
        assert losses[12] < 0.8 * losses[1], (name, losses)
    # Every position of the batch ranks up to 32 upcoming tokens (fewer near the end).
    assert 10 < tb["objectives/top/window_tokens"][12] <= 32


def test_top_under_fsdp_and_tensor_parallel_matches_single_process(tmp_path, twin_corpus):
    common = (
        "--objectives.stack", "ntp,top", "--objectives.top.window", "16",
        "--objectives.top.chunk_size", "48",
        "--training.dataset_path", str(twin_corpus), "--training.steps", "3",
    )  # fmt: skip
    logged = run_from_one_seed(tmp_path, common, {
        "fsdp": (2, ()),
        "tp_compiled_loss_ac": (2, (*TP, "--compile.enable", "--compile.components", "loss",
                                    "--activation_checkpoint.mode", "selective")),
    }, **PROBE)  # fmt: skip
    assert (
        "Compiling objectives with torch.compile: ntp, top"
        in logged["tp_compiled_loss_ac"]["stdout"]
    )
    tags = ("objectives/ntp/loss", "objectives/top/loss", "grad_norm")
    assert_same_numbers(logged, tags, steps=3)
    assert_same_gradients(tmp_path, ["fsdp", "tp_compiled_loss_ac"])
