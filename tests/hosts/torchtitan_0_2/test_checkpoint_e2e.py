"""Resume, stack changes across a resume, exports without objective modules (torchtitan's
and ``titan-objectives export``, then lm-eval on them), and recovery from a killed rank
(CPU, gloo)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.export_checks import assert_transformers_computes
from tests.helpers import DEBUG_CONFIG, ROOT, TINY, scalars, train
from titan_objectives.cli import main

pytestmark = pytest.mark.slow

CHECKPOINT = ("--checkpoint.enable", "--checkpoint.folder", "ckpt")
FULL = (*CHECKPOINT, "--checkpoint.no-last_save_model_only")
STACK = ("--objectives.stack", "ntp,nitp,mtp", "--objectives.mtp.depth", "2")
OBJECTIVE_TAGS = ("objectives/ntp/loss", "objectives/nitp/loss", "objectives/mtp/loss", "grad_norm")


PIPELINE = (
    "--parallelism.pipeline_parallel_degree",
    "2",
    "--parallelism.data_parallel_shard_degree",
    "1",
)


@pytest.mark.parametrize(("nproc", "parallelism"), [(1, ()), (2, ()), (2, PIPELINE)])
def test_resume_continues_the_uninterrupted_run(tmp_path, nproc, parallelism):
    """Under FSDP2 and under PP 2 (the objectives' modules on the last stage) too."""
    common = (*STACK, *FULL, "--checkpoint.interval", "3", "--training.steps", "6", *parallelism)
    train(tmp_path / "whole", *common, nproc=nproc)
    # The same run, stopped after step 3: its folder holds step 3 only.
    shutil.copytree(tmp_path / "whole" / "ckpt", tmp_path / "resumed" / "ckpt")
    shutil.rmtree(tmp_path / "resumed" / "ckpt" / "step-6")
    result = train(tmp_path / "resumed", *common, nproc=nproc)
    assert "Loading the checkpoint from" in result.stdout and "step-3" in result.stdout
    whole, resumed = scalars(tmp_path / "whole"), scalars(tmp_path / "resumed")
    for tag in OBJECTIVE_TAGS:
        assert sorted(resumed[tag]) == [4, 5, 6]
        for step in (4, 5, 6):
            if nproc == 1:  # same process layout, same order of every operation: bitwise
                assert resumed[tag][step] == whole[tag][step], (tag, step)
            else:  # fp32 over gloo: equal up to reduction-order noise
                assert resumed[tag][step] == pytest.approx(whole[tag][step], rel=1e-5), tag
    if parallelism:
        # Exported from the stages' checkpoint: the plain model, as one process saves it.
        assert main(["export", str(tmp_path / "whole"), "--out", str(tmp_path / "hf")]) == 0
        assert_exported_model_is_the_checkpoints(
            tmp_path / "hf", tmp_path / "whole" / "ckpt" / "step-6"
        )


def assert_exported_model_is_the_checkpoints(folder, checkpoint) -> None:
    """The export computes what the llama3 debug model loaded from ``checkpoint`` does."""
    from torchtitan.models.llama3 import Transformer, llama3_args

    plain = Transformer(llama3_args["debugmodel"])
    with torch.no_grad():
        plain.init_weights()
    plain = load_into(plain, checkpoint)
    tokens = torch.randint(0, llama3_args["debugmodel"].vocab_size, (2, 32))
    with torch.no_grad():
        assert_transformers_computes(folder, tokens, plain(tokens))


def test_objectives_added_and_removed_across_a_resume(tmp_path):
    train(tmp_path, "--objectives.stack", "ntp", *FULL, "--training.steps", "2")
    added = train(tmp_path, "--objectives.stack", "ntp,nitp", *FULL, "--training.steps", "4")
    assert "has no state for objective(s) nitp: their modules keep their fresh" in added.stdout
    tb = scalars(tmp_path)
    assert sorted(tb["objectives/nitp/loss"]) == [3, 4]
    removed = train(tmp_path, "--objectives.stack", "ntp", *FULL, "--training.steps", "5")
    assert "holds state for objective(s) nitp, which the stack no longer has: ignored" in (
        removed.stdout
    )


def test_changed_objective_options_are_named(tmp_path):
    train(
        tmp_path,
        "--objectives.stack",
        "ntp,nitp",
        "--objectives.nitp.projector",
        "linear",
        *FULL,
        "--training.steps",
        "2",
    )
    result = train(
        tmp_path, "--objectives.stack", "ntp,nitp", *FULL, "--training.steps", "3", check=False
    )
    assert result.returncode != 0
    assert (
        "objective 'nitp' has no module 'objectives.nitp.projector.w1.weight' there "
        "(were its options changed?)" in result.stdout
    )


def test_extending_a_run_whose_last_save_is_model_only_names_the_cause(tmp_path):
    """torchtitan's default saves the last step model-only; relaunching with more steps
    (as users extend runs) would fail on 'Missing key dataloader.dp_rank_0'."""
    train(tmp_path, *CHECKPOINT, "--training.steps", "3")
    result = train(tmp_path, *CHECKPOINT, "--training.steps", "6", check=False)
    assert result.returncode != 0
    assert "step-3 holds the model only, not the optimizer, data loader and step" in result.stdout
    assert "--checkpoint.no-last_save_model_only" in result.stdout
    assert "Missing key" not in result.stdout
    # Saved complete, the same run extends.
    train(tmp_path / "full", *FULL, "--training.steps", "3")
    extended = train(tmp_path / "full", *FULL, "--training.steps", "6")
    assert sorted(scalars(tmp_path / "full")["objectives/ntp/loss"]) == list(range(1, 7))
    assert "step-3" in extended.stdout


def test_missing_load_step_is_named(tmp_path):
    train(tmp_path, *FULL, "--training.steps", "1")
    result = train(tmp_path, *FULL, "--checkpoint.load_step", "7", check=False)
    assert result.returncode != 0
    assert "--checkpoint.load_step=7 but checkpoint" in result.stdout


def load_into(model, checkpoint_dir):
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(checkpoint_dir))
    model.load_state_dict(state)
    return model


@pytest.mark.long
def test_export_has_no_objective_modules_and_gives_the_same_logits(tmp_path):
    from torchtitan.models.llama3 import Transformer, llama3_args
    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

    from tests.hosts.torchtitan_0_2.building import llama3_with_objectives
    from titan_objectives.objectives import MTPOptions, NITPOptions, NTPOptions, TOPOptions

    steps = ("--training.steps", "3")
    # With TOP too: its head is a [vocab, dim] unembedding that must not ship.
    stack = (
        "--objectives.stack",
        "ntp,nitp,mtp,top",
        "--objectives.mtp.depth",
        "2",
        "--objectives.top.window",
        "16",
    )
    train(tmp_path / "full", *stack, *FULL, *steps)
    train(tmp_path / "export", *stack, *CHECKPOINT, *steps)
    train(tmp_path / "hf", *stack, *CHECKPOINT, "--checkpoint.last_save_in_hf", *steps)
    train(tmp_path / "bf16", *stack, *CHECKPOINT, "--checkpoint.export_dtype", "bfloat16", *steps)

    args = llama3_args["debugmodel"]
    options = {
        "ntp": NTPOptions(),
        "nitp": NITPOptions(),
        "mtp": MTPOptions(depth=2),
        "top": TOPOptions(window=16),
    }
    trained = llama3_with_objectives(args, options)
    with torch.no_grad():
        trained.init_weights()
    trained = load_into(trained, tmp_path / "full" / "ckpt" / "step-3")
    plain = Transformer(args)
    with torch.no_grad():
        plain.init_weights()
    exported_keys = set(plain.state_dict())
    plain = load_into(plain, tmp_path / "export" / "ckpt" / "step-3")

    tokens = torch.randint(0, args.vocab_size, (2, 32))
    with torch.no_grad():
        expected = trained(tokens)
        assert torch.equal(plain(tokens), expected)

    from torch.distributed.checkpoint import FileSystemReader

    bf16 = FileSystemReader(str(tmp_path / "bf16" / "ckpt" / "step-3")).read_metadata()
    assert set(bf16.state_dict_metadata) == exported_keys
    assert {m.properties.dtype for m in bf16.state_dict_metadata.values()} == {torch.bfloat16}

    # The HF export, through the model's own adapter.
    from safetensors.torch import load_file

    hf_files = sorted((tmp_path / "hf" / "ckpt" / "step-3").glob("*.safetensors"))
    hf_state = {k: v for f in hf_files for k, v in load_file(f).items()}
    assert not any("objectives" in k for k in hf_state)
    adapter = Llama3StateDictAdapter(args, None)
    from_hf = Transformer(args)
    from_hf.load_state_dict(adapter.from_hf(hf_state), strict=False)
    with torch.no_grad():
        from_hf.freqs_cis = from_hf._precompute_freqs_cis()
        torch.testing.assert_close(from_hf(tokens), expected, rtol=1e-5, atol=1e-5)

    # `titan-objectives export`: every kind of last save becomes a folder transformers
    # loads as it is and that computes the trained model's logits.
    for run in ("full", "export", "hf"):
        assert main(["export", str(tmp_path / run), "--out", str(tmp_path / f"{run}_hf")]) == 0
        assert_transformers_computes(tmp_path / f"{run}_hf", tokens, expected)
    assert main(["export", str(tmp_path / "bf16"), "--out", str(tmp_path / "bf16_hf")]) == 0
    assert json.loads((tmp_path / "bf16_hf" / "config.json").read_text())["dtype"] == "bfloat16"
    # The bf16 weights, computed in fp32: the trained logits up to bf16's rounding.
    assert_transformers_computes(tmp_path / "bf16_hf", tokens, expected, 0.05, kl=1e-4)

    # `compare --evaluate`: each run exported and scored by lm-eval, one row per run.
    report = tmp_path / "report"
    runs = [str(tmp_path / "full"), str(tmp_path / "export")]
    limit = ("--tasks", "tangled_tale_cloze", "--limit", "4")
    assert main(["compare", *runs, "--out", str(report), "--evaluate", *limit]) == 0
    summary = (report / "summary.md").read_text().split("# Downstream scores (lm-eval)")[1]
    rows = [line.split("|")[2:] for line in summary.splitlines() if line.startswith("| ")]
    assert rows[0][:2] == [" tangled_tale_cloze/perplexity ", " tangled_tale_cloze/acc "]
    assert rows[1] == rows[2]  # the same weights, the same scores
    assert (tmp_path / "full" / "hf" / "step-3" / "config.json").is_file()
    (results,) = (tmp_path / "full" / "eval").glob("results_*.json")
    scored = json.loads(results.read_text())["results"]["tangled_tale_cloze"]
    assert 0 <= scored["acc,none"] <= 1 and scored["perplexity,none"] > 1

    # `evaluate RUN_DIR` on the run saved in Hugging Face format: exported, then scored.
    perplexity = ("--tasks", "tangled_tale_perplexity", "--limit", "4")
    assert main(["evaluate", str(tmp_path / "hf"), *perplexity]) == 0
    (results,) = (tmp_path / "hf" / "eval").glob("results_*.json")
    scored = json.loads(results.read_text())["results"]["tangled_tale_perplexity"]
    assert scored["bits_per_byte,none"] > 0 and scored["word_perplexity,none"] > 1
    assert (tmp_path / "hf" / "hf" / "step-3" / "model.safetensors").is_file()

    trained_params = sum(p.numel() for p in trained.parameters())
    exported_params = sum(p.numel() for p in plain.parameters())
    print(f"training model {trained_params:,} parameters, exported {exported_params:,}")
    assert exported_keys == set(Transformer(args).state_dict())
    assert trained_params - exported_params == sum(
        p.numel() for p in trained.objectives.parameters()
    )


def rank_pids(rank: int) -> list[int]:
    """Worker processes of titan_objectives.train with the given RANK."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if b"titan_objectives.train" in cmdline and f"RANK={rank}".encode() in environ:
            if b"torch.distributed.run" not in cmdline:
                pids.append(int(entry))
    return pids


def test_a_killed_rank_resumes_from_the_last_complete_checkpoint(tmp_path):
    args = (*FULL, "--checkpoint.interval", "2", "--training.steps", "8")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "localhost:0",
        "--role",
        "rank",
        "--tee",
        "3",
        "-m",
        "titan_objectives.train",
        "--job.config_file",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(tmp_path),
        *TINY,
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    first = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    step4 = tmp_path / "ckpt" / "step-4" / ".metadata"
    deadline = time.time() + 300
    while not step4.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert step4.exists(), "no checkpoint at step 4"
    for pid in rank_pids(1):
        os.kill(pid, signal.SIGKILL)
    first.wait(timeout=120)
    assert first.returncode != 0
    # A checkpoint being written when the rank died has no .metadata: never loaded.
    (tmp_path / "ckpt" / "step-99").mkdir()
    (tmp_path / "ckpt" / "step-99" / "__0_0.distcp").write_bytes(b"partial")

    complete = max(
        int(p.name.split("-")[1])
        for p in (tmp_path / "ckpt").glob("step-*")
        if (p / ".metadata").exists()
    )
    second = train(tmp_path, *args, nproc=2)
    assert (
        f"step-{complete}" in second.stdout
        and "step-99" not in second.stdout.split("Loading the checkpoint from")[1].splitlines()[0]
    )
    tb = scalars(tmp_path)
    assert max(tb["objectives/ntp/loss"]) == 8
    assert (tmp_path / "ckpt" / "step-8" / ".metadata").exists()
