"""``titan-objectives check-parallel`` on torchtitan 0.3: the built-ins pass under FSDP2
(each rank reading its own copy of the corpus) and TP; a plugin that forgets a sum across
sequence shards fails, named."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.hosts.torchtitan_0_3.test_config_and_plugins import installed_plugin  # noqa: F401

pytestmark = pytest.mark.slow

COMMAND = str(Path(sys.executable).parent / "titan-objectives")
JOB = ["--module", "titan_objectives.hosts.torchtitan_0_3", "--config", "llama3_debug"]
TINY = ["--training.seq_len", "64", "--training.local_batch_size", "4"]


def check_parallel(plugin_site: Path, *args: str) -> tuple[int, dict[str, str]]:
    result = subprocess.run(
        [COMMAND, "check-parallel", "--nproc", "2", *JOB, *TINY, *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(plugin_site), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr[-3000:]
    verdicts = {
        line.split()[0]: "FAIL" if "FAIL" in line else line.split()[-1]
        for line in result.stdout.splitlines()
        if line.startswith(("objectives/", "loss_metrics/", "grad_norm"))
    }
    return result.returncode, verdicts


def test_the_builtins_pass_under_fsdp(installed_plugin):  # noqa: F811
    code, verdicts = check_parallel(installed_plugin, "--objectives.stack", "ntp,nitp")
    assert code == 0 and set(verdicts.values()) == {"ok"}, verdicts
    assert {"objectives/ntp/loss", "objectives/nitp/loss", "grad_norm"} <= set(verdicts)


def test_a_plugin_that_forgets_a_sum_across_shards_fails_under_tp(installed_plugin):  # noqa: F811
    stack = ("--objectives.stack", "ntp,nitp,forgets_shard_sum")
    code, verdicts = check_parallel(
        installed_plugin, *stack, "--parallelism.tensor_parallel_degree", "2"
    )
    assert code == 1
    assert verdicts["objectives/forgets_shard_sum/loss"] == "FAIL"
    assert verdicts["objectives/ntp/loss"] == verdicts["objectives/nitp/loss"] == "ok"


@pytest.fixture(scope="module")
def skip_token_site(tmp_path_factory):
    from tests.helpers import pip_install

    return pip_install(ROOT / "examples" / "skip_token", tmp_path_factory.mktemp("skip_site"))


@pytest.mark.parametrize(
    "parallelism", [(), ("--parallelism.tensor_parallel_degree", "2")], ids=["fsdp2", "tp2"]
)
def test_the_skip_token_example_matches_one_process(skip_token_site, parallelism):
    stack = ("--objectives.stack", "ntp,skip_token", "--objectives.skip_token.chunk_size", "64")
    code, verdicts = check_parallel(skip_token_site, *stack, *parallelism)
    assert code == 0 and set(verdicts.values()) == {"ok"}, verdicts
    assert "objectives/skip_token/loss" in verdicts
