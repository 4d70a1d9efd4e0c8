"""``titan-objectives validate`` and ``describe`` on torchtitan 0.3: the same flags as
training, the same checks, torchtitan 0.3's own parameter and FLOP count."""

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

COMMAND = str(Path(sys.executable).parent / "titan-objectives")
NITP_JOB = ["--module", "titan_objectives.hosts.torchtitan_0_3", "--config", "llama3_debug_nitp"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([COMMAND, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_validate_counts_each_objective_against_torchtitans_model_count():
    import torch

    from titan_objectives.hosts.torchtitan_0_3.config_registry import llama3_debug_nitp

    result = run("validate", *NITP_JOB)
    assert result.returncode == 0, result.stderr[-3000:]
    model_config = llama3_debug_nitp().model_spec.model
    seq_len = llama3_debug_nitp().training.seq_len
    with torch.device("meta"):
        params, flops = model_config.get_nparams_and_flops(model_config.build(), seq_len)
    assert f"{params:,} parameters, {flops / 1e6:,.1f} MFLOPs per token" in result.stdout
    d = model_config.dim
    nitp_row = next(line for line in result.stdout.splitlines() if line.startswith("nitp "))
    assert f"{12 * d * d:,}" in nitp_row  # SwiGLU projector: 12 d^2 parameters
    assert f"{72 * d * d / 1e6:,.2f}" in nitp_row  # the paper's 72 d^2 FLOPs per token
    assert result.stdout.rstrip().endswith(
        "--module titan_objectives.hosts.torchtitan_0_3 --config llama3_debug_nitp: OK"
    )


def test_describe_takes_the_objectives_flags_and_toml_table(tmp_path):
    toml = tmp_path / "objectives.toml"
    toml.write_text('[objectives]\nstack = ["ntp", "mtp"]\n[objectives.mtp]\ndepth = 2\n')
    result = run("describe", *NITP_JOB, "--objectives.toml", str(toml))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stack: ntp + mtp" in result.stdout and ": OK" not in result.stdout
    result = run(
        "describe",
        *NITP_JOB,
        "--objectives.stack",
        "ntp,top",
        "--parallelism.tensor_parallel_degree",
        "2",
    )
    assert "stack: ntp + top" in result.stdout
    assert "parallelism checked: dp_replicate 1, dp_shard -1, tp 2, cp 1, pp 1, ep 1" in (
        result.stdout
    )


def test_validate_exits_2_naming_the_flag_and_value():
    result = run("validate", *NITP_JOB, "--objectives.nitp.target_layer", "9")
    assert result.returncode == 2
    assert "config error: objectives.nitp.target_layer = 9 is not allowed" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("validate", "--config", "llama3_debug")
    assert result.returncode == 2 and "expected --module and --config" in result.stderr


def test_run_train_exits_2_with_the_message_and_no_traceback():
    import os

    result = subprocess.run(
        [str(ROOT / "scripts" / "run_train.sh"), "--objectives.nitp.target_layer", "9"],
        env=dict(os.environ, PYTHON=sys.executable, NGPU="1", TORCHTITAN="0.3"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "titan-objectives: config error: objectives.nitp.target_layer = 9" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_spells_objectives_as_registered(tmp_path):
    import os

    from tests.helpers import pip_install

    site = pip_install(ROOT / "tests" / "plugin_fixture", tmp_path / "site")
    result = subprocess.run(
        [sys.executable, "-m", "titan_objectives.train", *NITP_JOB, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(site), RANK="0"),
    )
    help_text = " ".join(result.stdout.split())
    assert "--objectives.hidden_rms.target_rms" in help_text
    assert "--objectives.geometry.max_tokens" in help_text and "max-tokens" not in help_text
