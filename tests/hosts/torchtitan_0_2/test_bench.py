"""The benchmark scripts run (CPU smoke mode); their figures are not asserted."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.long
def test_bench_tiny_prints_the_chosen_stacks():
    stacks = "ntp,torchtitan (plain),ntp+nitp"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--tiny",
            "--stacks",
            stacks,
            "--steps",
            "4",
            "--warmup",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| stack")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == stacks.split(",")
    flops = {name: row.split("|")[7].strip() for name, row in zip(names, rows, strict=True)}
    assert flops["ntp"] == flops["torchtitan (plain)"] == "+0.0%"
    assert float(flops["ntp+nitp"].rstrip("%")) > 0


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
