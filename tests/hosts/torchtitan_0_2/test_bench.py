"""The benchmark scripts run (CPU smoke mode); their figures are not asserted."""

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def bench_rows(*args: str) -> dict[str, list[str]]:
    """``scripts/bench.py --tiny ARGS``: its table's cells by row name, in order."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--steps", "4"]
        + ["--warmup", "1", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| stack")]
    return {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows}


@pytest.mark.long
def test_bench_tiny_prints_the_chosen_stacks():
    stacks = "ntp,torchtitan (plain),ntp+nitp"
    rows = bench_rows("--stacks", stacks, "--rounds", "1")
    assert list(rows) == stacks.split(",")
    flops = {name: cells[5] for name, cells in rows.items()}
    assert flops["ntp"] == flops["torchtitan (plain)"] == "+0.0%"
    assert float(flops["ntp+nitp"].rstrip("%")) > 0


@pytest.mark.long
def test_bench_pipeline_parallel_alternates_rounds():
    """Under PP 2, plain torchtitan and a stack, each against ntp in the same round: the
    median of 2 rounds' ratios with their spread (``ntp`` against itself: exactly 0)."""
    rows = bench_rows("--pp", "2", "--rounds", "2", "--stacks", "ntp,ntp+nitp")
    assert list(rows) == ["ntp", "ntp+nitp"]
    assert rows["ntp"][3].startswith("+0.0% (+0.0 to +0.0)")
    assert re.fullmatch(r"[+-]\d+\.\d% \([+-]\d+\.\d to [+-]\d+\.\d\).*", rows["ntp+nitp"][3])


def test_bench_loss_small():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_loss.py"),
            "--vocab",
            "512",
            "--hidden",
            "64",
            "--tokens",
            "256",
            "--chunk-size",
            "64",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--repeats",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 512 | 256 |")]
    from titan_objectives.losses import torch_has_linear_cross_entropy

    backends = (
        ["plain", "torch", "chunked"] if torch_has_linear_cross_entropy() else ["plain", "chunked"]
    )
    assert [row.split("|")[3].strip() for row in rows] == backends
    assert rows[0].split("|")[5].strip() == "1.00"  # plain against itself


def test_bench_top_small_gives_the_same_loss_both_ways():
    result = subprocess.run(
        # A small vocabulary: every window repeats tokens (token 0 among them).
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_top.py"),
            "--vocab",
            "64",
            "--hidden",
            "32",
            "--batch",
            "2",
            "--seq",
            "64",
            "--window",
            "16",
            "--chunk-size",
            "32",
            "--device",
            "cpu",
            "--repeats",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in result.stdout.splitlines()
        if line.startswith("| sparse") or line.startswith("| dense")
    }
    assert set(rows) == {"sparse", "dense"}
    assert float(rows["sparse"][6]) == pytest.approx(float(rows["dense"][6]), rel=1e-5)
