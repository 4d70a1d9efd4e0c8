"""The loop decides from what objectives declare, never from their names: an objective
from another package gets exactly the checks a built-in gets."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import DEBUG_CONFIG, ROOT
from tests.hosts.torchtitan_0_2.test_registry import installed_plugin  # noqa: F401 (fixture)

# Run in a fresh process, as a user's job would: the [objectives] section is built from
# the entry points installed when the config module is first imported.
CHECK_CONFIGS = """
import json, sys
from titan_objectives.hosts.torchtitan_0_2.runtime import cpu as cpu_runtime
cpu_runtime.activate()
from titan_objectives.config import ObjectivesConfigError
from titan_objectives.hosts.torchtitan_0_2.cli import checked_config
results = []
for argv in json.loads(sys.argv[1]):
    try:
        checked_config(argv)
        results.append("OK")
    except ObjectivesConfigError as error:
        results.append(str(error))
print("RESULTS " + json.dumps(results))
"""

PARALLEL_CASES = {
    "tensor_parallel_shard_too_short": [
        "--parallelism.tensor_parallel_degree",
        "2",
        "--training.seq_len",
        "4",
    ],
    "reshard_after_forward_always": ["--parallelism.fsdp_reshard_after_forward", "always"],
    "context_parallel_run_too_short": [
        "--parallelism.context_parallel_degree",
        "4",
        "--training.seq_len",
        "16",
    ],
}


def check_configs(plugin_site, argvs: list[list[str]]) -> list[str]:
    """The config-time verdict ("OK" or the error message) for each command line."""
    env = dict(os.environ, PYTHONPATH=str(plugin_site))
    result = subprocess.run(
        [sys.executable, "-c", CHECK_CONFIGS, json.dumps(argvs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULTS ")]
    assert line, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(line[0].removeprefix("RESULTS "))


def test_a_plugin_reading_three_ahead_gets_the_errors_mtp_gets(installed_plugin):  # noqa: F811
    base = ["--job.config_file", str(DEBUG_CONFIG)]
    mtp = ["--objectives.stack", "ntp,mtp", "--objectives.mtp.depth", "3"]
    plugin = ["--objectives.stack", "ntp,third_token"]
    argvs = [[*base, *stack, *case] for case in PARALLEL_CASES.values() for stack in (mtp, plugin)]
    # hidden_rms does not declare sequence_parallel: refused under CP as under TP. Without
    # these settings, both stacks pass.
    argvs += [
        [
            *base,
            "--objectives.stack",
            "ntp,hidden_rms",
            *PARALLEL_CASES["context_parallel_run_too_short"],
        ],
        [*base, *mtp],
        [*base, *plugin],
    ]
    verdicts = check_configs(installed_plugin, argvs)
    for i, case in enumerate(PARALLEL_CASES):
        from_mtp, from_plugin = verdicts[2 * i], verdicts[2 * i + 1]
        print(f"{case}:\n  {from_mtp}\n  {from_plugin}")
        assert from_mtp != "OK" and from_plugin != "OK", case
        # The same message, the objective's name (and set options) aside.
        as_template = lambda message, name: re.sub(  # noqa: E731
            rf"\b{name}( \([^)]*\))?", "NAME", message.replace("'ntp', ", "")
        )
        assert as_template(from_mtp, "mtp") == as_template(from_plugin, "third_token"), case
    assert "reads hidden states 3 positions ahead" in verdicts[0]
    assert "reads hidden states 3 positions ahead" in verdicts[1]
    assert "a rank holds runs of 2 consecutive positions" in verdicts[5]
    assert "third_token shifts hidden states 3 positions ahead" in verdicts[5]
    assert "hidden_rms, which cannot run with parallelism.context_parallel_degree" in verdicts[-3]
    assert verdicts[-2:] == ["OK", "OK"]


def test_no_decision_in_the_glue_depends_on_a_builtins_name():
    """Messages may name built-ins; code may not branch on them."""
    name = r"""["'](ntp|nitp|mtp|top)["']"""
    branch_on_name = re.compile(
        rf"(==|!=|\bin)\s*{name}|{name}\s*(==|!=|(not\s+)?in\b)|\w\[{name}\]|\.get\({name}"
    )
    offenders = []
    glue = [
        ROOT / "titan_objectives" / "config.py",
        *ROOT.glob("titan_objectives/hosts/**/*.py"),
    ]
    for path in glue:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if branch_on_name.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize(
    ("requirements", "expected"),
    [
        ({"lookahead": 1}, {"lookahead": 3}),
        ({"output_weight": True, "geometry_layers": frozenset({2})}, {"output_weight": True}),
    ],
)
def test_declarations_merge_over_the_stack(requirements, expected):
    from titan_objectives import Requirements

    merged = Requirements(lookahead=3, geometry_layers=frozenset({1})) | Requirements(
        **requirements
    )
    for key, value in expected.items():
        assert getattr(merged, key) == value
    assert merged.geometry_layers >= {1}


def test_top_reads_labels_ahead_but_hidden_states_in_place():
    """TOP's window is refused under CP (it reads labels W - 1 ahead) but not bound by a TP
    sequence shard (its hidden states are read at t only)."""
    from types import SimpleNamespace

    from tests.helpers import stack_of
    from titan_objectives import ModelInfo, Requirements
    from titan_objectives.hosts.common.checks import check_tensor_parallel
    from titan_objectives.objectives import TOPOptions

    info = ModelInfo(dim=8, n_layers=2, vocab_size=16, seq_len=1024)
    stack = stack_of({"top": TOPOptions(window=1024)}, info)
    needs = stack.requirements()
    assert needs.lookahead == 1023 and needs.shard_reach == 0
    job_config = SimpleNamespace(
        parallelism=SimpleNamespace(tensor_parallel_degree=8),
        training=SimpleNamespace(seq_len=1024),
    )
    check_tensor_parallel(job_config, stack)
    merged = needs | Requirements(lookahead=2)  # with an objective that shifts by 2
    assert merged.lookahead == 1023 and merged.shard_reach == 2
