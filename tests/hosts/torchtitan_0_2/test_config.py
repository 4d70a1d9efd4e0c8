"""The [objectives] section: TOML and CLI parsing, and every bad input named clearly."""

import logging
import re

import pytest
import torch
from torchtitan.config import ConfigManager

from tests.helpers import DEBUG_CONFIG, ROOT, needs_pytorch_kernel, run_module
from titan_objectives.config import ObjectivesConfigError
from titan_objectives.hosts.torchtitan_0_2.preflight import check_config, check_toml_file
from titan_objectives.objectives.nitp import NITPOptions

OBJECTIVES_BLOCK = re.compile(r"\[objectives\].*?(?=\n\[profiling\])", re.S)


def write_config(tmp_path, objectives_toml: str):
    """The debug config with its [objectives] tables replaced."""
    path = tmp_path / "job.toml"
    path.write_text(OBJECTIVES_BLOCK.sub(objectives_toml.strip() + "\n", DEBUG_CONFIG.read_text()))
    return path


def parse(path, *overrides):
    """What the trainer does before building anything: parse, then check."""
    argv = ["--job.config_file", str(path), *overrides]
    check_toml_file(argv)
    return check_config(ConfigManager().parse_args(argv))


def test_toml_stack_and_options(tmp_path):
    path = write_config(
        tmp_path,
        """
        [objectives]
        stack = ["ntp", "nitp"]
        [objectives.nitp]
        weight = 1       # an integer is a valid float
        target_layer = 0
        projector = "linear"
        loss = "smooth_l1"
        """,
    )
    checked = parse(path)
    assert list(checked.options) == ["ntp", "nitp"]
    assert checked.options["nitp"] == NITPOptions(
        weight=1.0, target_layer=0, projector="linear", loss="smooth_l1"
    )
    assert checked.model_info.n_layers == 6 and checked.model_info.dim == 256


def test_cli_overrides_in_torchtitan_style(tmp_path):
    path = write_config(tmp_path, '[objectives]\nstack = ["ntp"]')
    checked = parse(
        path,
        "--objectives.stack",
        "ntp,nitp",
        "--objectives.nitp.weight",
        "0.8",
        "--objectives.nitp.target_layer",
        "3",
        "--objectives.nitp.loss",
        "mse",
    )
    assert list(checked.options) == ["ntp", "nitp"]
    assert checked.options["nitp"] == NITPOptions(weight=0.8, target_layer=3, loss="mse")


def test_model_name_and_flavor_stay_torchtitans(tmp_path):
    config = ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG)])
    assert (config.model.name, config.model.flavor) == ("llama3", "debugmodel")


def test_default_target_layer_follows_the_model(tmp_path):
    path = write_config(tmp_path, '[objectives]\nstack = ["ntp", "nitp"]')
    checked = parse(path)
    assert checked.options["nitp"].resolved_target_layer(checked.model_info) == 2  # ceil(1.2)


BAD_CONFIGS = {
    "unknown_objective": (
        '[objectives]\nstack = ["ntp", "nitpp"]',
        r"objectives\.stack: unknown objective 'nitpp'; registered objectives: .*nitp.*ntp",
    ),
    "unknown_option": (
        '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\nwieght = 0.5',
        r"unknown option objectives\.nitp\.wieght; allowed: weight, schedule, warmup_steps, "
        r"switch_step, weight_after, target_layer, projector, loss",
    ),
    "unknown_objective_table": (
        '[objectives]\nstack = ["ntp"]\n[objectives.mystery]\nweight = 0.5',
        r"unknown key objectives\.mystery; allowed: stack, .*\[objectives\.nitp\]",
    ),
    "unknown_section_key": (
        '[objectives]\nstack = ["ntp"]\nstacks = ["ntp"]',
        r"unknown key objectives\.stacks",
    ),
    "wrong_type": (
        '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\nweight = "heavy"',
        r"objectives\.nitp\.weight = 'heavy' has the wrong type; expected a number",
    ),
    "wrong_literal": (
        '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\nprojector = "mlp"',
        r"objectives\.nitp\.projector = 'mlp' is not allowed; "
        r"expected one of 'swiglu', 'linear', 'none'",
    ),
    "unknown_ce_backend": (
        '[objectives]\nstack = ["ntp", "mtp"]\n[objectives.mtp]\nce_backend = "liger"',
        r"objectives\.mtp\.ce_backend = 'liger' is not allowed; "
        r"expected one of 'auto', 'torch', 'chunked', 'plain'",
    ),
    "stack_not_a_list": ('[objectives]\nstack = "ntp"', r"objectives\.stack = 'ntp'"),
    "negative_weight": (
        '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\nweight = -0.5',
        r"objectives\.nitp\.weight = -0\.5 is not allowed; expected a finite number >= 0",
    ),
    "nan_weight": (
        '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\nweight = nan',
        r"objectives\.nitp\.weight = nan has the wrong type; expected a finite number",
    ),
    "inf_weight": (
        '[objectives]\nstack = ["ntp"]\n[objectives.ntp]\nweight = inf',
        r"objectives\.ntp\.weight = inf has the wrong type; expected a finite number",
    ),
    "empty_stack": ("[objectives]\nstack = []", r"objectives\.stack is empty"),
    "duplicate": (
        '[objectives]\nstack = ["ntp", "nitp", "ntp"]',
        r"objectives\.stack = \['ntp', 'nitp', 'ntp'\] names ntp more than once",
    ),
    "target_layer_too_deep": (
        '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\ntarget_layer = 6',
        r"objectives\.nitp\.target_layer = 6 is not allowed; expected an integer in 0\.\.5 "
        r"for a model with 6 blocks",
    ),
    "target_layer_negative": (
        '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\ntarget_layer = -1',
        r"objectives\.nitp\.target_layer = -1 is not allowed",
    ),
    "target_layer_float": (
        '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\ntarget_layer = 2.5',
        r"objectives\.nitp\.target_layer = 2\.5 has the wrong type; expected an integer or None",
    ),
    "mtp_depth_zero": (
        '[objectives]\nstack = ["ntp", "mtp"]\n[objectives.mtp]\ndepth = 0',
        r"objectives\.mtp\.depth = 0 is not allowed; expected an integer >= 1",
    ),
    "mtp_unknown_variant": (
        '[objectives]\nstack = ["ntp", "mtp"]\n[objectives.mtp]\nvariant = "medusa"',
        r"objectives\.mtp\.variant = 'medusa' is not allowed; "
        r"expected one of 'deepseek', 'parallel'",
    ),
    "mtp_depth_beyond_sequence": (
        '[objectives]\nstack = ["ntp", "mtp"]\n[objectives.mtp]\ndepth = 256',
        r"objectives\.mtp\.depth = 256 is not allowed; expected an integer < "
        r"training\.seq_len = 256",
    ),
    "chunk_size_negative": (
        '[objectives]\nstack = ["ntp"]\n[objectives.ntp]\nchunk_size = -8',
        r"objectives\.ntp\.chunk_size = -8 is not allowed; expected 0 \(off\) or a number",
    ),
    "mtp_chunk_size_negative": (
        '[objectives]\nstack = ["ntp", "mtp"]\n[objectives.mtp]\nchunk_size = -1',
        r"objectives\.mtp\.chunk_size = -1 is not allowed",
    ),
    "schedule_without_parameters": (
        '[objectives]\nstack = ["ntp", "mtp"]\n[objectives.mtp]\nschedule = "step"',
        r"objectives\.mtp\.switch_step = 0 is not allowed; expected an integer >= 1 with "
        r"schedule = 'step'",
    ),
    "warmup_without_steps": (
        '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\nschedule = "linear_warmup"',
        r"objectives\.nitp\.warmup_steps = 0 is not allowed",
    ),
    "geometry_layer_missing": (
        '[objectives]\nstack = ["ntp"]\n[objectives.geometry]\nfreq = 10\nlayers = [7]',
        r"objectives\.geometry\.layers: 7 is not a hidden state of a model with 6 blocks",
    ),
    "geometry_negative_freq": (
        '[objectives]\nstack = ["ntp"]\n[objectives.geometry]\nfreq = -1',
        r"objectives\.geometry\.freq = -1 is not allowed",
    ),
    "geometry_sample_smaller_than_width": (
        '[objectives]\nstack = ["ntp"]\n[objectives.geometry]\nfreq = 10\nmax_tokens = 100',
        r"objectives\.geometry\.max_tokens = 100 is too small to estimate a rank: the model "
        r"width is 256",
    ),
    "geometry_unknown_option": (
        '[objectives]\nstack = ["ntp"]\n[objectives.geometry]\nevery = 10',
        r"unknown option objectives\.geometry\.every; allowed: freq, layers, max_tokens, pairs",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_named(tmp_path, case):
    toml, message = BAD_CONFIGS[case]
    with pytest.raises(ObjectivesConfigError, match=message):
        parse(write_config(tmp_path, toml))


BAD_OVERRIDES = {
    "cli_negative_weight": (
        ["--objectives.stack", "ntp,nitp", "--objectives.nitp.weight", "-1"],
        r"objectives\.nitp\.weight = -1\.0 is not allowed",
    ),
    "cli_unknown_objective": (["--objectives.stack", "ntp,foo"], r"unknown objective 'foo'"),
    "cli_tensor_parallel_mtp_deeper_than_a_shard": (
        [
            "--objectives.stack",
            "ntp,mtp",
            "--objectives.mtp.depth",
            "100",
            "--parallelism.tensor_parallel_degree",
            "4",
        ],
        r"objectives\.mtp \(depth = 100\) reads hidden states 100 positions ahead, with "
        r"parallelism\.tensor_parallel_degree = 4 and training\.seq_len = 256: each rank "
        r"holds 64 positions",
    ),
    "cli_tensor_parallel_pytorch_chunked_mtp": (
        [
            "--objectives.stack",
            "ntp,mtp",
            "--objectives.mtp.chunk_size",
            "64",
            "--objectives.mtp.ce_backend",
            "torch",
            "--parallelism.tensor_parallel_degree",
            "2",
        ],
        r"objectives\.mtp \(chunk_size = 64, ce_backend = 'torch'\) with "
        r"parallelism\.tensor_parallel_degree = 2: these options need the whole vocabulary on "
        r"each rank",
    ),
    "cli_ce_backend_without_chunks": (
        ["--objectives.ntp.ce_backend", "chunked"],
        r"objectives\.ntp\.ce_backend = 'chunked' is not allowed; expected 'auto' or 'plain' "
        r"with chunk_size = 0",
    ),
    "cli_plain_ce_backend_with_chunks": (
        ["--objectives.ntp.ce_backend", "plain", "--objectives.ntp.chunk_size", "64"],
        r"objectives\.ntp\.ce_backend = 'plain' is not allowed; expected 'auto', 'torch' or "
        r"'chunked' with chunk_size = 64",
    ),
    "moe_target_layer_too_deep": (
        [
            "--model.name",
            "deepseek_v3",
            "--model.flavor",
            "debugmodel",
            "--objectives.stack",
            "ntp,nitp",
            "--objectives.nitp.target_layer",
            "6",
        ],
        r"objectives\.nitp\.target_layer = 6 is not allowed; expected an integer in 0\.\.5 "
        r"for a model with 6 blocks",
    ),
    "pipeline_fewer_micro_batches_than_stages": (
        ["--objectives.stack", "ntp,nitp", "--parallelism.pipeline_parallel_degree", "2"]
        + ["--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"]
        + ["--training.local_batch_size", "2"],
        r"training\.local_batch_size = 2 with parallelism\.pipeline_parallel_microbatch_size "
        r"= 1 gives 2 micro-batches for 4 pipeline stages \(Interleaved1F1B\): the objectives "
        r"need a whole number of micro-batches, at least one per stage",
    ),
    "pipeline_schedule_without_objectives": (
        ["--objectives.stack", "ntp,mtp", "--parallelism.pipeline_parallel_degree", "2"]
        + ["--parallelism.pipeline_parallel_schedule", "DualPipeV"],
        r"parallelism\.pipeline_parallel_schedule = 'DualPipeV' with objectives\.stack = "
        r"\['ntp', 'mtp'\]: the objectives score micro-batches under GPipe, 1F1B, "
        r"Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble; use one of them",
    ),
    "pipeline_validation_under_zbv": (
        ["--objectives.stack", "ntp,nitp", "--parallelism.pipeline_parallel_degree", "2"]
        + ["--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble", "--validation.enable"],
        r"validation\.enable with parallelism\.pipeline_parallel_schedule = 'ZBVZeroBubble': "
        r"torch cannot evaluate under this schedule",
    ),
    "pipeline_stage_without_the_final_norm": (
        ["--objectives.stack", "ntp,nitp", "--parallelism.pipeline_parallel_degree", "2"]
        + ["--parallelism.module_fqns_per_model_part"]
        + [
            '[["tok_embeddings", "layers.0", "layers.1", "layers.2", "norm"], '
            '["layers.3", "layers.4", "layers.5", "output"]]'
        ],
        r"the objectives read the final norm's output on the last stage; put 'norm' and the "
        r"output head in the last part",
    ),
    "cli_context_parallel_mtp_beyond_a_chunk": (
        ["--objectives.stack", "ntp,mtp", "--objectives.mtp.depth", "3"]
        + ["--parallelism.context_parallel_degree", "4", "--training.seq_len", "16"],
        r"training\.seq_len = 16 with parallelism\.context_parallel_degree = 4: a rank holds "
        r"runs of 2 consecutive positions, and mtp shifts hidden states 3 positions ahead",
    ),
    "context_parallel_split": (
        ["--objectives.stack", "ntp", "--parallelism.context_parallel_degree", "4"]
        + ["--training.seq_len", "68"],
        r"training\.seq_len = 68 with parallelism\.context_parallel_degree = 4: context "
        r"parallelism cuts each sequence into 8 chunks \(two per rank, load-balanced\); use a "
        r"seq_len divisible by 8",
    ),
    "missing_dataset": (
        ["--training.dataset_path", "/no/such/corpus.txt"],
        r"training\.dataset_path: dataset path '/no/such/corpus\.txt' does not exist",
    ),
    "missing_tokenizer": (
        ["--model.hf_assets_path", "/no/such/tokenizer"],
        r"model\.hf_assets_path = '/no/such/tokenizer' has no tokenizer\.json",
    ),
    "mtp_reshard_always": (
        ["--objectives.stack", "ntp,mtp", "--parallelism.fsdp_reshard_after_forward", "always"],
        r"fsdp_reshard_after_forward = 'always' with mtp: they read the output head",
    ),
    "unknown_flavor": (
        ["--model.flavor", "tinymodel"],
        r"model\.flavor = 'tinymodel' is not a llama3 flavor; available: debugmodel",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_override_is_named(case):
    overrides, message = BAD_OVERRIDES[case]
    if needs_pytorch_kernel(overrides):
        pytest.skip("this torch has no F.linear_cross_entropy")
    with pytest.raises(ObjectivesConfigError, match=message):
        parse(DEBUG_CONFIG, *overrides)


def test_options_for_an_objective_not_in_the_stack_warn(tmp_path, caplog):
    path = write_config(tmp_path, '[objectives]\nstack = ["ntp"]\n[objectives.nitp]\nweight = 0.5')
    with caplog.at_level(logging.WARNING, logger="titan_objectives.config"):
        checked = parse(path)
    assert list(checked.options) == ["ntp"]
    assert "[objectives.nitp] is set but 'nitp' is not in objectives.stack" in caplog.text


def test_a_stack_that_never_reads_the_output_head_warns(tmp_path, caplog):
    path = write_config(tmp_path, '[objectives]\nstack = ["nitp"]')
    with caplog.at_level(logging.WARNING):
        checked = parse(path)
    assert list(checked.options) == ["nitp"]
    assert "no objective reads the output head" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse(path, "--objectives.stack", "mtp")  # trains the head on tokens further ahead
    assert "no objective reads the output head" not in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--objectives.stack", "ntp,nitpp"], "unknown objective 'nitpp'"),
        (["--objectives.nitp.target_layer", "9"], "objectives.nitp.target_layer = 9"),
    ],
)
def test_trainer_exits_before_building_the_model(overrides, message):
    result = run_module(
        "titan_objectives.train", "--job.config_file", str(DEBUG_CONFIG), *overrides
    )
    assert result.returncode == 2, result.stdout[-3000:]
    assert "titan-objectives: config error: objectives." in result.stdout
    assert message in result.stdout
    assert "Building llama3" not in result.stdout


def test_trainer_rejects_unknown_toml_option_before_torchtitan(tmp_path):
    path = write_config(tmp_path, '[objectives]\nstack = ["ntp", "nitp"]\n[objectives.nitp]\nk = 2')
    result = run_module("titan_objectives.train", "--job.config_file", str(path))
    assert result.returncode == 2
    assert "unknown option objectives.nitp.k; allowed: weight, schedule" in result.stdout


def test_unknown_cli_flag_is_rejected_by_the_parser():
    result = run_module(
        "titan_objectives.train",
        "--job.config_file",
        str(DEBUG_CONFIG),
        "--objectives.nitp.wieght",
        "0.5",
    )
    assert result.returncode != 0
    assert "--objectives.nitp.wieght" in result.stdout


@pytest.mark.parametrize("path", sorted((DEBUG_CONFIG.parent).glob("*.toml")), ids=lambda p: p.name)
def test_bundled_configs_validate(path):
    # Real-size configs name a tokenizer and corpora the user downloads; the bundled ones
    # stand in for them here.
    checked = parse(
        path,
        "--model.hf_assets_path",
        "assets/tokenizer-bpe2k-tiny",
        "--training.dataset_path",
        "assets/tiny/train.txt",
        "--validation.dataset_path",
        "assets/tiny/val.txt",
    )
    assert checked.options["ntp"].weight == 1.0
    if path.name == "llama3_8b_nitp.toml":
        assert checked.model_info.n_layers == 32
        assert checked.options["nitp"].target_layer == 6


def test_tensor_parallel_refuses_objectives_that_do_not_declare_it(clean_registry):
    from types import SimpleNamespace

    from tests.helpers import stack_of
    from titan_objectives import (
        ModelInfo,
        Objective,
        ObjectiveOptions,
        Requirements,
        register_objective,
    )
    from titan_objectives.hosts.common.checks import check_tensor_parallel
    from titan_objectives.objectives import NTPOptions

    @register_objective("logit_norm")
    class LogitNorm(Objective):  # per position, but says nothing about sequence shards
        def requirements(self):
            return Requirements(logits=True)

    job_config = SimpleNamespace(
        parallelism=SimpleNamespace(tensor_parallel_degree=2),
        training=SimpleNamespace(seq_len=256),
    )
    model = ModelInfo(dim=8, n_layers=2, vocab_size=16, seq_len=256)
    with pytest.raises(
        ObjectivesConfigError,
        match=r"objectives\.stack has logit_norm, which cannot run with "
        r"parallelism\.tensor_parallel_degree = 2: the objective does not declare "
        r"sequence_parallel = True",
    ):
        options = {"ntp": NTPOptions(), "logit_norm": ObjectiveOptions()}
        check_tensor_parallel(job_config, stack_of(options, model))
    check_tensor_parallel(job_config, stack_of({"ntp": NTPOptions()}, model))


def test_an_objective_that_cannot_be_built_for_the_model_is_named(monkeypatch):
    from titan_objectives.hosts.torchtitan_0_2 import preflight
    from titan_objectives.hosts.torchtitan_0_2.model_adapter import ModelFamily

    # An adapter (e.g. for a new model family) whose block module has no TransformerBlock:
    # MTP cannot build its extra block. Found by building the stack on the meta device.
    broken = ModelFamily("titan_objectives.objective")
    monkeypatch.setattr(preflight, "model_family", lambda name: broken)
    with pytest.raises(
        ObjectivesConfigError,
        match=r"objectives\.stack has 'mtp' \(depth = 2\), which cannot be built for "
        r"model\.name = 'llama3' \(flavor 'debugmodel'\): AttributeError: .*TransformerBlock.*; "
        r"remove it from the stack",
    ):
        parse(DEBUG_CONFIG, "--objectives.stack", "ntp,mtp", "--objectives.mtp.depth", "2")
    parse(DEBUG_CONFIG, "--objectives.stack", "ntp,nitp")  # no extra block needed


def test_forcing_pytorchs_kernel_on_a_torch_without_it_is_named(monkeypatch):
    """The GPU image's torch 2.11 has no F.linear_cross_entropy: 'torch' is a config
    error there, naming the key and the installed version; 'auto' falls back."""
    import torch
    import torch.nn.functional as F

    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    with pytest.raises(
        ObjectivesConfigError,
        match=rf"objectives\.ntp\.ce_backend = 'torch' is not allowed; expected 'auto' or "
        rf"'chunked': torch {re.escape(torch.__version__)} has no "
        r"torch\.nn\.functional\.linear_cross_entropy \(PyTorch 2\.13 and later\)",
    ):
        parse(
            DEBUG_CONFIG,
            "--objectives.ntp.chunk_size",
            "64",
            "--objectives.ntp.ce_backend",
            "torch",
        )
    parse(DEBUG_CONFIG, "--objectives.ntp.chunk_size", "64")


def test_tensor_parallel_refuses_a_plan_that_leaves_parameters_unsplit(clean_registry):
    """Found by the config checks (and ``titan-objectives validate``), not at build time."""
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel

    from titan_objectives import Objective, Requirements, register_objective

    @register_objective("projected")
    class Projected(Objective):
        sequence_parallel = True

        def __init__(self, options, model):
            super().__init__(options, model)
            self.projection = nn.Linear(model.dim, model.dim)
            self.scale = nn.Parameter(torch.ones(model.dim))

        def requirements(self):
            return Requirements(final_hidden=True)

        def tensor_parallel_plan(self):
            return {"projection": ColwiseParallel()}

    tp = ["--parallelism.tensor_parallel_degree", "2"]
    with pytest.raises(
        ObjectivesConfigError,
        match=r"objectives\.projected with parallelism\.tensor_parallel_degree = 2: its "
        r"tensor_parallel_plan\(\) leaves parameters scale unsplit",
    ):
        parse(DEBUG_CONFIG, "--objectives.stack", "ntp,projected", *tp)
    # MTP's blocks are the model's own kind: the model's plan splits them.
    parse(DEBUG_CONFIG, "--objectives.stack", "ntp,nitp,mtp", *tp)


def test_run_train_exits_2_with_the_message_and_no_traceback():
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [str(ROOT / "scripts" / "run_train.sh"), "--objectives.nitp.target_layer", "9"],
        env=dict(os.environ, PYTHON=sys.executable, NGPU="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "titan-objectives: config error: objectives.nitp.target_layer = 9 is not allowed; "
        "expected an integer in 0..5 for a model with 6 blocks (0 = embeddings)"
    )
