"""Real torchtitan 0.3 trainings with objectives (CPU, gloo): the main job, validation,
geometry, checkpoints and the model-only export, FSDP2 against one process, and ntp
against torchtitan's own trainer."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from tests.helpers import scalars, torchrun

pytestmark = pytest.mark.slow

HOST = ["titan_objectives.train", "--module", "titan_objectives.hosts.torchtitan_0_3"]
TINY = [
    "--training.seq_len",
    "64",
    "--training.local_batch_size",
    "4",
    "--lr_scheduler.warmup_steps",
    "2",
    "--metrics.log_freq",
    "1",
    "--metrics.enable_tensorboard",
    "--metrics.disable_color_printing",
    "--debug.seed",
    "42",
]


def train(
    folder: Path, config: str, *overrides: str, nproc: int = 1, module=HOST, **torchrun_kwargs
):
    return torchrun(
        [*module, "--config", config, "--dump_folder", str(folder), *TINY, *overrides],
        nproc=nproc,
        **torchrun_kwargs,
    )


def saved_keys(checkpoint: Path) -> set[str]:
    return set(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)


@pytest.mark.long
def test_main_job_trains_validates_measures_checkpoints_and_exports(tmp_path):
    """ntp + nitp on the bundled data: both losses fall; objectives, geometry and validation
    values reach TensorBoard; checkpoints hold the objectives' modules, the model-only save
    at the last step does not; a run resumed from step 5 continues exactly."""
    run = (
        "llama3_debug_nitp",
        "--training.steps",
        "10",
        "--objectives.geometry.freq",
        "5",
        "--objectives.geometry.max_tokens",
        "256",
        "--validator.enable",
        "--validator.freq",
        "10",
        "--validator.steps",
        "2",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "5",
        "--checkpoint.last_save_model_only",
    )
    result = train(tmp_path / "a", *run)
    assert "objectives  ntp:" in result.stdout
    logged = scalars(tmp_path / "a")
    for name in ("ntp", "nitp"):
        losses = logged[f"objectives/{name}/loss"]
        assert losses[10] < 0.97 * losses[1], (name, losses)
        assert f"validation/objectives/{name}/loss" in logged
    for tag in (
        "geometry/final/effective_rank",
        "geometry/layer_2/avg_cosine",
        "validation/geometry/final/effective_rank",
    ):
        assert tag in logged, sorted(logged)

    checkpoints = tmp_path / "a" / "checkpoint"
    full, exported = saved_keys(checkpoints / "step-5"), saved_keys(checkpoints / "step-10")
    assert any(key.startswith("objectives.nitp.") for key in full)
    assert "tok_embeddings.weight" in exported
    assert not any("objectives." in key for key in exported)

    # Resume from the full checkpoint at step 5: steps 6..10 repeat exactly.
    shutil.copytree(tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint")
    shutil.rmtree(tmp_path / "b" / "checkpoint" / "step-10")
    train(tmp_path / "b", *run)
    resumed = scalars(tmp_path / "b")
    for step in range(6, 11):
        for tag in ("objectives/ntp/loss", "objectives/nitp/loss"):
            assert resumed[tag][step] == pytest.approx(logged[tag][step], rel=1e-6), (tag, step)


def first_moments(checkpoint: Path, parameters: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Adam's ``exp_avg`` of each parameter in a full checkpoint: a weighted sum of its
    gradients so far, whole (FSDP/TP shards are gathered by the load)."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    state = {
        key: torch.zeros(metadata[key].size)
        for name in parameters
        for key in [f"optimizer.state.{name}.exp_avg"]
    }
    dcp.load(state, checkpoint_id=str(checkpoint))
    return state


@pytest.mark.long
def test_stack_under_fsdp2_and_tp_matches_one_process(tmp_path, twin_corpus):
    """ntp + nitp + mtp (D = 2) from one seed checkpoint, with selective AC (the debug
    config's): FSDP2 on 2 processes (each reads its own copy of the corpus) and TP 2
    (sequence parallel, loss parallel: torchtitan 0.3's only TP) with the objectives
    compiled, and one process accumulating gradients over two micro-batches, log the
    losses and grad norm of one process; so does validation under TP."""
    common = (
        "llama3_debug",
        "--objectives.stack",
        "ntp,nitp,mtp",
        "--objectives.mtp.depth",
        "2",
        "--dataloader.dataset_path",
        str(twin_corpus),
        "--training.steps",
        "3",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "100",
        "--validator.enable",
        "--validator.freq",
        "3",
        "--validator.steps",
        "1",
    )
    train(tmp_path / "seed", *common, "--checkpoint.create_seed_checkpoint")
    seed = saved_keys(tmp_path / "seed" / "checkpoint" / "step-0")
    assert any(key.startswith("objectives.nitp.") for key in seed)
    tp = (
        "--parallelism.tensor_parallel_degree",
        "2",
        "--parallelism.data_parallel_shard_degree",
        "1",
        "--compile.enable",
        "--compile.components",
        "loss",
    )
    logged, stdout = {}, {}
    accumulate = ("--training.local_batch_size", "2", "--training.global_batch_size", "4")
    runs = (("one", 1, ()), ("fsdp", 2, ()), ("tp", 2, tp), ("accumulate", 1, accumulate))
    for name, nproc, overrides in runs:
        shutil.copytree(tmp_path / "seed" / "checkpoint", tmp_path / name / "checkpoint")
        stdout[name] = train(tmp_path / name, *common, *overrides, nproc=nproc).stdout
        assert "Objectives recompute their activations in backward" in stdout[name]
        logged[name] = scalars(tmp_path / name)
    assert "Compiling objectives" in stdout["tp"]
    tags = [
        "objectives/ntp/loss",
        "objectives/nitp/loss",
        "objectives/mtp/depth_2",
        "loss_metrics/global_avg_loss",
        "grad_norm",
    ]
    validated = [*tags, "validation/objectives/nitp/loss"]
    for name, compared in (("fsdp", tags), ("tp", validated), ("accumulate", tags)):
        worst = max(
            abs(logged[name][tag][step] / logged["one"][tag][step] - 1)
            for tag in compared
            for step in logged["one"][tag]
        )
        print(f"{name}: largest relative difference from one process {worst:.1e}")
        assert worst < 1e-4, name
    # Gradients themselves, not only their norm: Adam's first moments after step 3 (the
    # embedding's takes MTP's gradient through the embedding outputs it reads).
    parameters = (
        "tok_embeddings.weight",
        "layers.0.attention.qkv_linear.wqkv.weight",
        "norm.weight",
        "lm_head.weight",
        "objectives.mtp.depths.0.projection.weight",
    )
    expected = first_moments(tmp_path / "one" / "checkpoint" / "step-3", parameters)
    for name in ("fsdp", "tp", "accumulate"):
        moments = first_moments(tmp_path / name / "checkpoint" / "step-3", parameters)
        for key, value in expected.items():
            scale = value.abs().max().item()
            worst = (moments[key] - value).abs().max().item() / scale
            print(f"{name} {key}: largest difference / largest entry {worst:.1e}")
            torch.testing.assert_close(moments[key], value, rtol=1e-4, atol=1e-4 * scale)


def test_ntp_alone_is_torchtitans_own_training(tmp_path):
    """A plain ntp stack gives, bit for bit, the losses and grad norms of torchtitan 0.3's
    own Trainer on the same config (its cross-entropy loss), over 6 steps."""
    common = ("--training.steps", "6")
    train(tmp_path / "ours", "llama3_debug", *common)
    plain = [
        "titan_objectives.hosts.torchtitan_0_3.baseline",
        "--module",
        "titan_objectives.hosts.torchtitan_0_3",
    ]
    train(tmp_path / "plain", "llama3_debug_torchtitan", *common, module=plain)
    ours, theirs = scalars(tmp_path / "ours"), scalars(tmp_path / "plain")
    for tag in ("loss_metrics/global_avg_loss", "grad_norm"):
        assert [ours[tag][s] for s in range(1, 7)] == [theirs[tag][s] for s in range(1, 7)]
    # ... and the loss is the objective's: the stack ran, not torchtitan's loss function.
    assert ours["objectives/ntp/loss"] == ours["loss_metrics/global_avg_loss"]


@pytest.mark.parametrize("config", ["deepseek_v3_debug", "qwen3_debug"])
def test_moe_and_tied_models_train_the_whole_stack(tmp_path, config):
    """deepseek_v3 (MoE, MLA) and qwen3 (tied embeddings): ntp + nitp + mtp + top, with the
    MTP block of the model's own kind, on 2 processes (FSDP2). On deepseek_v3 the MTP
    block's router is balanced like the trunk's (its expert bias moves)."""
    train(
        tmp_path,
        config,
        "--objectives.stack",
        "ntp,nitp,mtp,top",
        "--objectives.top.window",
        "16",
        "--training.steps",
        "2",
        "--training.local_batch_size",
        "2",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
        nproc=2,
    )
    logged = scalars(tmp_path)
    for name in ("ntp", "nitp", "mtp", "top"):
        losses = logged[f"objectives/{name}/loss"]
        assert all(0 < value < 20 for value in losses.values()), (name, losses)
    checkpoint = tmp_path / "checkpoint" / "step-2"
    biases = sorted(k for k in saved_keys(checkpoint) if k.endswith("expert_bias_E"))
    if config == "deepseek_v3_debug":
        ours = [k for k in biases if k.startswith("objectives.mtp.")]
        assert ours, biases
        state = {key: torch.zeros(8) for key in ours}
        dcp.load(state, checkpoint_id=str(checkpoint))
        assert all(value.abs().sum() > 0 for value in state.values())
