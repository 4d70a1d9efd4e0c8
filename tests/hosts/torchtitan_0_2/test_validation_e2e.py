"""Validation gives the objectives the forward context training gives them."""

import math
from pathlib import Path

import pytest

from tests.helpers import scalars, train

pytestmark = pytest.mark.slow

TESTS = str(Path(__file__).parent)


def test_validation_with_flex_attention_runs_mtp_blocks_with_the_trunks_masks(tmp_path):
    """DeepSeek-V3 671B's attention (flex, block-causal masks) on the debug model: MTP's
    block needs the masks the trunk ran with. Forward only: CPU flex has no backward."""
    train(
        tmp_path,
        "--model.flavor",
        "debugmodel_flex_attn",
        "--objectives.stack",
        "ntp,nitp,mtp",
        "--objectives.mtp.depth",
        "2",
        "--validation.enable",
        "--validation.steps",
        "2",
        "--validation.seq_len",
        "64",
        "--objectives.geometry.freq",
        "1",
        module="trainer_probes",
        extra_pythonpath=TESTS,
        env={"TRAINER_PROBE": "validate_only"},
    )
    logged = scalars(tmp_path)
    for name in ("ntp", "nitp", "mtp"):
        assert math.isfinite(logged[f"validation/objectives/{name}/loss"][1]), name
    # The objectives see the very forward torchtitan's validation loss comes from.
    assert logged["validation/objectives/ntp/loss"][1] == pytest.approx(
        logged["validation_metrics/loss"][1], rel=1e-5
    )
    assert "validation/geometry/final/effective_rank" in logged
