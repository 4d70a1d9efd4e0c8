"""Real torchtitan 0.3 trainings with objectives (CPU, gloo): the main job, validation,
geometry, checkpoints and the model-only export, FSDP2 against one process, and ntp
against torchtitan's own trainer."""

import shutil
from pathlib import Path

import pytest
from helpers import scalars, torchrun
from torch.distributed.checkpoint import FileSystemReader

pytestmark = pytest.mark.slow

HOST = ["titan_objectives.train", "--module", "titan_objectives.hosts.torchtitan_0_3"]
TINY = [
    "--training.seq_len", "64", "--training.local_batch_size", "4",
    "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
    "--metrics.enable_tensorboard", "--metrics.disable_color_printing", "--debug.seed", "42",
]  # fmt: skip


def train(folder: Path, config: str, *overrides: str, nproc: int = 1, module=HOST):
    return torchrun(
        [*module, "--config", config, "--dump_folder", str(folder), *TINY, *overrides],
        nproc=nproc,
    )


def saved_keys(checkpoint: Path) -> set[str]:
    return set(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)


def test_main_job_trains_validates_measures_checkpoints_and_exports(tmp_path):
    """ntp + nitp on the bundled data: both losses fall; objectives, geometry and validation
    values reach TensorBoard; checkpoints hold the objectives' modules, the model-only save
    at the last step does not; a run resumed from step 5 continues exactly."""
    run = (
        "llama3_debug_nitp", "--training.steps", "10", "--objectives.geometry.freq", "5",
        "--objectives.geometry.max_tokens", "256", "--validator.enable",
        "--validator.freq", "10", "--validator.steps", "2", "--checkpoint.enable",
        "--checkpoint.interval", "5", "--checkpoint.last_save_model_only",
    )  # fmt: skip
    result = train(tmp_path / "a", *run)
    assert "objectives  ntp:" in result.stdout
    logged = scalars(tmp_path / "a")
    for name in ("ntp", "nitp"):
        losses = logged[f"objectives/{name}/loss"]
        assert losses[10] < 0.97 * losses[1], (name, losses)
        assert f"validation/objectives/{name}/loss" in logged
    for tag in ("geometry/final/effective_rank", "geometry/layer_2/avg_cosine",
                "validation/geometry/final/effective_rank"):  # fmt: skip
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


def test_stack_under_fsdp2_matches_one_process(tmp_path, twin_corpus):
    """ntp + nitp + mtp (D = 2) from one seed checkpoint: FSDP2 on 2 processes (each reads
    its own copy of the corpus) logs the losses and grad norm of one process."""
    common = (
        "llama3_debug", "--objectives.stack", "ntp,nitp,mtp", "--objectives.mtp.depth", "2",
        "--dataloader.dataset_path", str(twin_corpus), "--training.steps", "3",
        "--checkpoint.enable", "--checkpoint.interval", "100",
    )  # fmt: skip
    train(tmp_path / "seed", *common, "--checkpoint.create_seed_checkpoint")
    logged = {}
    for name, nproc in (("one", 1), ("fsdp", 2)):
        shutil.copytree(tmp_path / "seed" / "checkpoint", tmp_path / name / "checkpoint")
        train(tmp_path / name, *common, nproc=nproc)
        logged[name] = scalars(tmp_path / name)
    tags = ("objectives/ntp/loss", "objectives/nitp/loss", "objectives/mtp/depth_2",
            "loss_metrics/global_avg_loss", "grad_norm")  # fmt: skip
    for tag in tags:
        for step in (1, 2, 3):
            expected = logged["one"][tag][step]
            assert logged["fsdp"][tag][step] == pytest.approx(expected, rel=1e-4), (tag, step)


def test_ntp_alone_is_torchtitans_own_training(tmp_path):
    """A plain ntp stack gives, bit for bit, the losses and grad norms of torchtitan 0.3's
    own Trainer on the same config (its cross-entropy loss), over 6 steps."""
    common = ("--training.steps", "6")
    train(tmp_path / "ours", "llama3_debug", *common)
    plain = ["titan_objectives.hosts.torchtitan_0_3.baseline", "--module",
             "titan_objectives.hosts.torchtitan_0_3"]  # fmt: skip
    train(tmp_path / "plain", "llama3_debug_torchtitan", *common, module=plain)
    ours, theirs = scalars(tmp_path / "ours"), scalars(tmp_path / "plain")
    for tag in ("loss_metrics/global_avg_loss", "grad_norm"):
        assert [ours[tag][s] for s in range(1, 7)] == [theirs[tag][s] for s in range(1, 7)]
