"""The host-independent commands (``list``, ``compare``), run as a user runs them, in
each host's environment."""

import runpy
import subprocess
import sys

from torch.utils.tensorboard import SummaryWriter

from tests.helpers import ROOT
from titan_objectives.registry import list_objectives


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "titan_objectives.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_list_names_every_registered_objective_and_its_options():
    result = command("list")
    assert result.returncode == 0, result.stderr
    for name in list_objectives():
        assert f"{name}  (" in result.stdout
    assert "nitp  (module titan_objectives.objectives.nitp)" in result.stdout
    assert "    target_layer: int | None = None" in result.stdout
    assert "    loss: 'cosine' | 'smooth_l1' | 'mse' = 'cosine'" in result.stdout
    assert "        Distance between P(h_t) and the target" in result.stdout
    assert "    depth: int = 1" in result.stdout
    # The whole summary paragraph, not its first line.
    listed = " ".join(result.stdout.split())
    assert (
        "parallel heads, each a block of the model's own kind, through the model's shared" in listed
    )


def test_compare_reads_tensorboard_logs_into_plots_and_a_table(tmp_path):
    for run, offset in (("ntp", 0.0), ("nitp", 0.5)):
        writer = SummaryWriter(str(tmp_path / run / "tb"))
        for step in range(1, 4):
            writer.add_scalar("objectives/ntp/loss", 8.0 - step + offset, step)
        writer.close()
    out = tmp_path / "report"
    result = command("compare", str(tmp_path / "ntp"), str(tmp_path / "nitp"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "losses.png").is_file()
    table = (out / "summary.md").read_text()
    assert "| tag | ntp | nitp |" in table
    assert "5.0000 (step 3)" in table and "5.5000 (step 3)" in table


def test_generated_reference_is_up_to_date():
    generator = runpy.run_path(str(ROOT / "scripts" / "gen_objectives_doc.py"))
    assert generator["DOC"].read_text() == generator["builtin_reference"](), (
        "docs/objectives.md is out of date: run python scripts/gen_objectives_doc.py"
    )
