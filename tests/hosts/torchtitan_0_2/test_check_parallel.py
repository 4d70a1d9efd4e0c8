"""``titan-objectives check-parallel`` on torchtitan 0.2.2: a plugin right under
parallelism passes, one that forgets a sum across sequence shards fails, named."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DEBUG_CONFIG, ROOT, TINY
from tests.hosts.torchtitan_0_2.test_registry import installed_plugin  # noqa: F401 (fixture)

COMMAND = str(Path(sys.executable).parent / "titan-objectives")


def check_parallel(
    plugin_site: Path, *args: str, temporary: Path | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(plugin_site), OMP_NUM_THREADS="1")
    if temporary is not None:
        env["TMPDIR"] = str(temporary)
    return subprocess.run(
        [COMMAND, "check-parallel", "--nproc", "2", str(DEBUG_CONFIG), *TINY, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def rows(output: str) -> dict[str, str]:
    return {
        line.split()[0]: line.split()[-1] if "FAIL" not in line else "FAIL"
        for line in output.splitlines()
        if line.startswith(("objectives/", "loss_metrics/", "grad_norm"))
    }


@pytest.mark.slow
def test_a_plugin_right_under_fsdp_passes(installed_plugin, tmp_path):  # noqa: F811
    stack = ("--objectives.stack", "ntp,third_token")
    result = check_parallel(installed_plugin, *stack, temporary=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert not list(tmp_path.glob("check-parallel-*"))  # its runs' folder is gone
    assert "2 processes (dp_replicate 1, dp_shard -1, tp 1" in result.stdout
    assert rows(result.stdout) == {
        "objectives/ntp/loss": "ok",
        "objectives/third_token/loss": "ok",
        "objectives/total/loss": "ok",
        "loss_metrics/global_avg_loss": "ok",
        "grad_norm": "ok",
    }


@pytest.mark.slow
def test_a_plugin_that_forgets_a_sum_across_shards_fails_under_tp_named(
    installed_plugin,  # noqa: F811
    tmp_path,
):
    stack = ("--objectives.stack", "ntp,forgets_shard_sum")
    tp = ("--parallelism.tensor_parallel_degree", "2")
    result = check_parallel(installed_plugin, *stack, *tp, temporary=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert not list(tmp_path.glob("check-parallel-*"))
    verdicts = rows(result.stdout)
    assert verdicts["objectives/forgets_shard_sum/loss"] == "FAIL"
    assert verdicts["objectives/ntp/loss"] == "ok"


def test_a_layout_that_does_not_fill_the_processes_is_named(installed_plugin):  # noqa: F811
    result = check_parallel(
        installed_plugin,
        "--parallelism.tensor_parallel_degree",
        "2",
        "--parallelism.data_parallel_shard_degree",
        "2",
    )
    assert result.returncode == 2
    assert "check-parallel --nproc 2 with parallelism dp_replicate 1, dp_shard 2, tp 2" in (
        result.stderr
    )
