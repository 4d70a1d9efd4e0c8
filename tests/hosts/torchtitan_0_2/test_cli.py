"""The titan-objectives command, the generated reference, and the bad-input audit."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DEBUG_CONFIG, ROOT, needs_pytorch_kernel
from tests.hosts.torchtitan_0_2.test_config import write_config
from titan_objectives import cli

COMMAND = str(Path(sys.executable).parent / "titan-objectives")
CONFIGS = ROOT / "toml_configs"


def run(*args):
    return subprocess.run([COMMAND, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_validate_counts_tops_head_and_window():
    result = run("validate", str(CONFIGS / "llama3_debug_top.toml"))
    assert result.returncode == 0, result.stderr
    vocab, dim, window = 2048, 256, 64
    top_row = next(line for line in result.stdout.splitlines() if line.startswith("top "))
    assert f"{vocab * dim:,}" in top_row  # the TOP head, a second [vocab, dim] unembedding
    assert f"{(6 * vocab * dim + 6 * window) / 1e6:,.2f}" in top_row  # 6 V d + the window


def test_user_docs_stay_inside_the_repository():
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "scripts").rglob("*")]:
        if path.is_file():
            assert "../shared" not in path.read_text(), path


def test_validate_reports_extra_parameters_and_flops_against_torchtitans_count():
    import torch
    from torchtitan.models.llama3 import Transformer, llama3_args

    result = run(
        "validate",
        str(CONFIGS / "llama3_8b_nitp.toml"),
        "--model.hf_assets_path",
        "assets/tokenizer-bpe2k-tiny",
    )
    assert result.returncode == 0, result.stderr
    args = llama3_args["8B"]
    with torch.device("meta"):
        _, model_flops = args.get_nparams_and_flops(Transformer(args), 8192)
    d = 4096
    nitp_row = next(line for line in result.stdout.splitlines() if line.startswith("nitp "))
    assert f"{12 * d * d:,}" in nitp_row  # SwiGLU projector: 12 d^2 parameters
    assert f"{72 * d * d / 1e6:,.2f}" in nitp_row  # the paper's 72 d^2 FLOPs per token
    assert f"{100 * 72 * d * d / model_flops:.2f}%" in nitp_row
    assert f"{model_flops / 1e6:,.1f} MFLOPs per token" in result.stdout
    assert result.stdout.rstrip().endswith("llama3_8b_nitp.toml: OK")


def test_describe_prints_the_table_alone_and_takes_overrides():
    result = run("describe", str(DEBUG_CONFIG), "--objectives.stack", "ntp,top")
    assert result.returncode == 0, result.stderr
    assert "stack: ntp + top" in result.stdout and "model: llama3 debugmodel" in result.stdout
    assert ": OK" not in result.stdout
    assert "parallelism checked: dp_replicate 1, dp_shard -1, tp 1, cp 1, pp 1, ep 1" in (
        result.stdout
    )
    result = run("describe", "--objectives.stack", "ntp")
    assert result.returncode == 2 and "expected the job config first" in result.stderr


def test_validate_fails_with_the_key():
    result = run("validate", str(DEBUG_CONFIG), "--objectives.nitp.target_layer", "9")
    assert result.returncode == 2
    assert "objectives.nitp.target_layer = 9 is not allowed" in result.stderr


def objectives_toml(body: str) -> str:
    return f'[objectives]\nstack = ["ntp", "nitp", "mtp"]\n{body}'


# (TOML that replaces the [objectives] tables or None, CLI overrides, fragment of the error)
AUDIT = {
    "weight_is_a_string": (
        objectives_toml('[objectives.nitp]\nweight = "1"'),
        [],
        "objectives.nitp.weight = '1' has the wrong type",
    ),
    "stack_is_a_string": ('[objectives]\nstack = "ntp,nitp"', [], "objectives.stack = 'ntp,nitp'"),
    "target_layer_is_a_float": (
        objectives_toml("[objectives.nitp]\ntarget_layer = 2.0"),
        [],
        "objectives.nitp.target_layer = 2.0 has the wrong type",
    ),
    "bool_is_a_string": (
        objectives_toml('[objectives.mtp]\nrecompute_heads = "yes"'),
        [],
        "objectives.mtp.recompute_heads = 'yes' has the wrong type",
    ),
    "unknown_section_key": (
        objectives_toml("stack_order = 1"),
        [],
        "unknown key objectives.stack_order",
    ),
    "unknown_option": (
        objectives_toml("[objectives.mtp]\ndepths = 2"),
        [],
        "unknown option objectives.mtp.depths; allowed:",
    ),
    "unknown_objective_table": (
        objectives_toml("[objectives.nitpp]\nweight = 1"),
        [],
        "unknown key objectives.nitpp",
    ),
    "unknown_top_level_section": ("[objectivez]\nstack = []", [], "objectivez"),
    "unknown_torchtitan_key": (None, [], "Invalid field names"),
    "unknown_cli_flag": (None, ["--objectives.nitp.wieght", "1"], "--objectives.nitp.wieght"),
    "target_layer_out_of_range": (
        objectives_toml("[objectives.nitp]\ntarget_layer = 6"),
        [],
        "objectives.nitp.target_layer = 6 is not allowed",
    ),
    "negative_weight": (
        None,
        ["--objectives.stack", "ntp,mtp", "--objectives.mtp.weight", "-0.1"],
        "objectives.mtp.weight = -0.1 is not allowed",
    ),
    "nan_weight": (
        objectives_toml("[objectives.nitp]\nweight = nan"),
        [],
        "objectives.nitp.weight = nan has the wrong type; expected a finite number",
    ),
    "inf_weight_after": (
        objectives_toml('[objectives.mtp]\nschedule = "step"\nswitch_step = 5\nweight_after = inf'),
        [],
        "objectives.mtp.weight_after = inf",
    ),
    "mtp_depth_zero": (
        objectives_toml("[objectives.mtp]\ndepth = 0"),
        [],
        "objectives.mtp.depth = 0 is not allowed",
    ),
    "mtp_depth_past_sequence": (
        None,
        [
            "--objectives.stack",
            "ntp,mtp",
            "--objectives.mtp.depth",
            "64",
            "--training.seq_len",
            "64",
        ],
        "objectives.mtp.depth = 64 is not allowed",
    ),
    "negative_chunk_size": (
        None,
        ["--objectives.ntp.chunk_size", "-1"],
        "objectives.ntp.chunk_size = -1 is not allowed",
    ),
    "warmup_steps_without_warmup": (
        objectives_toml("[objectives.nitp]\nwarmup_steps = 100"),
        [],
        "objectives.nitp.warmup_steps = 100 is not allowed; "
        "expected 0 unless schedule = 'linear_warmup'",
    ),
    "weight_after_without_step": (
        objectives_toml("[objectives.mtp]\nweight_after = 0.1"),
        [],
        "objectives.mtp.weight_after = 0.1 is not allowed",
    ),
    "step_schedule_without_weight_after": (
        objectives_toml('[objectives.mtp]\nschedule = "step"\nswitch_step = 10'),
        [],
        "objectives.mtp.weight_after = None is not allowed",
    ),
    "unknown_objective": (
        '[objectives]\nstack = ["ntp", "zloss"]',
        [],
        "unknown objective 'zloss'",
    ),
    "duplicate_objective": ('[objectives]\nstack = ["ntp", "ntp"]', [], "names ntp more than once"),
    "empty_stack": ("[objectives]\nstack = []", [], "objectives.stack is empty"),
    "bad_nonfinite_policy": (None, ["--objectives.nonfinite", "maybe"], "nonfinite"),
    "tensor_parallel_with_chunked_ce": (
        None,
        [
            "--objectives.ntp.chunk_size",
            "64",
            "--objectives.ntp.ce_backend",
            "torch",
            "--parallelism.tensor_parallel_degree",
            "2",
        ],
        "objectives.ntp (chunk_size = 64, ce_backend = 'torch') with "
        "parallelism.tensor_parallel_degree = 2",
    ),
    "pipeline_parallel_with_a_dual_pipe": (
        None,
        ["--objectives.stack", "ntp,mtp", "--parallelism.pipeline_parallel_degree", "2"]
        + ["--parallelism.pipeline_parallel_schedule", "DualPipeV"],
        "parallelism.pipeline_parallel_schedule = 'DualPipeV'",
    ),
    "context_parallel_with_ptrr": (
        None,
        ["--parallelism.context_parallel_degree", "2"]
        + ["--parallelism.context_parallel_load_balancer", "ptrr"],
        "parallelism.context_parallel_load_balancer = 'ptrr'",
    ),
    "reshard_always_with_chunked_ce": (
        None,
        ["--objectives.ntp.chunk_size", "64", "--parallelism.fsdp_reshard_after_forward", "always"],
        "fsdp_reshard_after_forward = 'always' with ntp",
    ),
    "missing_dataset": (
        None,
        ["--training.dataset_path", "no/such/books.jsonl.gz"],
        "training.dataset_path: dataset path 'no/such/books.jsonl.gz' does not exist",
    ),
    "missing_tokenizer": (
        None,
        ["--model.hf_assets_path", "no/such/dir"],
        "model.hf_assets_path = 'no/such/dir' has no tokenizer.json",
    ),
    "unknown_flavor": (None, ["--model.flavor", "70B_typo"], "model.flavor = '70B_typo'"),
    "unsupported_model": (None, ["--model.name", "flux"], "model.name = 'flux' has no"),
}


@pytest.mark.parametrize("case", list(AUDIT))
def test_bad_input_audit(case, tmp_path, capsys):
    toml, overrides, fragment = AUDIT[case]
    if needs_pytorch_kernel(overrides):
        pytest.skip("this torch has no F.linear_cross_entropy")
    config = DEBUG_CONFIG
    if case == "unknown_torchtitan_key":
        config = tmp_path / "job.toml"
        config.write_text(
            DEBUG_CONFIG.read_text().replace("[training]\n", "[training]\nbatchsize = 8\n")
        )
    elif toml is not None:
        config = write_config(tmp_path, toml)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["validate", str(config), *overrides])
    assert exit_info.value.code not in (0, None)
    captured = capsys.readouterr()
    assert fragment in captured.err + captured.out


def test_unreadable_tokenizer(tmp_path, capsys):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["validate", str(DEBUG_CONFIG), "--model.hf_assets_path", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "tokenizer.json cannot be read as a tokenizer" in capsys.readouterr().err


def test_audit_is_broad_enough():
    assert len(AUDIT) + 1 >= 25
