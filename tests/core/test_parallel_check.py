"""``check-parallel``'s temporary folder: removed after a comparison, kept when a training
run failed (the error names the log in it)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from titan_objectives.hosts.common import parallel_check
from titan_objectives.hosts.common.parallel_check import CheckPlan, CheckRunError, Difference

PARALLELISM = SimpleNamespace(
    data_parallel_shard_degree=-1,
    data_parallel_replicate_degree=1,
    tensor_parallel_degree=1,
    context_parallel_degree=1,
    pipeline_parallel_degree=1,
)
PLAN = CheckPlan([], "--job.dump_folder", "--training.dataset_path", "local_text", "", PARALLELISM)


@pytest.fixture
def folders(monkeypatch, tmp_path):
    """The work folders the comparison ran in; ``outcome`` sets how it ends."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(parallel_check.tempfile, "tempdir", None)  # TMPDIR read again
    used: list[Path] = []
    outcome = SimpleNamespace(error=None)

    def train_and_compare(plan, nproc, steps, work):
        used.append(work)
        (work / "seed.log").write_text("log")
        if outcome.error is not None:
            raise outcome.error
        return [Difference("grad_norm", 0.0)]

    monkeypatch.setattr(parallel_check, "train_and_compare", train_and_compare)
    return SimpleNamespace(used=used, outcome=outcome, root=tmp_path)


def test_a_finished_comparison_leaves_no_folder(folders):
    assert parallel_check.check_parallel(PLAN, 2, 3) == [Difference("grad_norm", 0.0)]
    assert folders.used[0].parent == folders.root
    assert list(folders.root.iterdir()) == []


def test_a_failed_training_run_keeps_its_log(folders):
    folders.outcome.error = CheckRunError("a training run failed (exit 1): see seed.log")
    with pytest.raises(CheckRunError):
        parallel_check.check_parallel(PLAN, 2, 3)
    assert (folders.used[0] / "seed.log").exists()


def test_any_other_error_leaves_no_folder(folders):
    folders.outcome.error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        parallel_check.check_parallel(PLAN, 2, 3)
    assert list(folders.root.iterdir()) == []


def test_a_folder_of_the_users_is_kept(folders, tmp_path):
    work = tmp_path / "mine"
    work.mkdir()
    parallel_check.check_parallel(PLAN, 2, 3, work)
    assert (work / "seed.log").exists()
