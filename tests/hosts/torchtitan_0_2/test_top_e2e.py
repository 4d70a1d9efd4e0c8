"""TOP in a real torchtitan run (CPU): training on the main job's data. The same numbers
under FSDP2 and TP 2 as on one process: ``test_parallelism_e2e``."""

import pytest

from tests.helpers import scalars, train

pytestmark = pytest.mark.slow


def test_ntp_top_trains_on_the_main_jobs_data_with_both_losses_falling(tmp_path):
    result = train(
        tmp_path,
        "--objectives.stack",
        "ntp,top",
        "--objectives.top.window",
        "32",
        "--training.steps",
        "12",
        "--lr_scheduler.warmup_steps",
        "3",
    )
    assert "top:" in result.stdout
    tb = scalars(tmp_path)
    for name in ("ntp", "top"):
        losses = tb[f"objectives/{name}/loss"]
        assert sorted(losses) == list(range(1, 13))
        assert losses[12] < 0.8 * losses[1], (name, losses)
    # Every position of the batch ranks up to 32 upcoming tokens (fewer near the end).
    assert 10 < tb["objectives/top/window_tokens"][12] <= 32
