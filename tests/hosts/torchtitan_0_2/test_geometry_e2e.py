"""Geometry and per-objective validation in real CPU runs, and the comparison report."""

import pytest

from tests.helpers import scalars, train
from titan_objectives.report import compare_runs, load_scalars

# One test process trains the shared runs (``--dist loadgroup`` keeps the module together).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("geometry_runs")]

GEOMETRY = (
    "--objectives.geometry.freq",
    "2",
    "--objectives.geometry.max_tokens",
    "256",
    "--validation.enable",
    "--validation.freq",
    "4",
    "--validation.steps",
    "2",
    "--validation.seq_len",
    "64",
    "--validation.local_batch_size",
    "4",
    "--training.steps",
    "4",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    train(base / "ntp", "--objectives.stack", "ntp", *GEOMETRY)
    train(base / "nitp", *GEOMETRY, nproc=2)
    return base


def test_geometry_scalars_every_freq_steps(runs):
    tb = scalars(runs / "nitp")
    # Default layers: the final hidden state and the NITP target (block 2 in the config).
    for layer in ("final", "layer_2"):
        for metric in ("effective_rank", "effective_rank_sv", "avg_cosine", "mean_cosine"):
            assert sorted(tb[f"geometry/{layer}/{metric}"]) == [2, 4], (layer, metric)
        for step in (2, 4):
            # The paper's rank weights the top directions more than the singular-value one.
            paper, sv = (
                tb[f"geometry/{layer}/{m}"][step] for m in ("effective_rank", "effective_rank_sv")
            )
            assert 1.0 <= paper < sv <= 256
            assert -1.0 <= tb[f"geometry/{layer}/avg_cosine"][step] <= 1.0
    assert "geometry/layer_2/effective_rank" not in scalars(runs / "ntp")  # no nitp: final only


def test_validation_logs_each_objective(runs):
    for run in ("ntp", "nitp"):
        tb = scalars(runs / run)
        # torchtitan's own validation loss is the CE: our ntp must equal it.
        for step, value in tb["validation_metrics/loss"].items():
            assert tb["validation/objectives/ntp/loss"][step] == pytest.approx(value, rel=1e-5)
        assert "validation/geometry/final/effective_rank" in tb
    nitp = scalars(runs / "nitp")["validation/objectives/nitp/loss"]
    assert sorted(nitp) == [1, 4] and all(0 < v <= 2 for v in nitp.values())


def test_compare_runs_writes_plots_and_table(runs, tmp_path):
    written = compare_runs([runs / "ntp", runs / "nitp"], tmp_path / "report")
    names = sorted(p.name for p in written)
    assert names == [
        "avg_cosine.png",
        "effective_rank.png",
        "effective_rank_sv.png",
        "losses.png",
        "summary.md",
    ]
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    table = (tmp_path / "report" / "summary.md").read_text()
    assert "| tag | ntp | nitp |" in table
    final_ntp = load_scalars(runs / "nitp")["objectives/ntp/loss"][4]
    assert "| objectives/ntp/loss | " in table and f"{final_ntp:.4f} (step 4)" in table
    assert "| geometry/layer_2/effective_rank |  | " in table  # absent in the ntp run
