"""``titan-objectives check-parallel``: an objective's numbers under a parallelism equal
one process's. The recipe of the project's own tests, as a command for plugin authors:
one seed checkpoint, the same data on every data-parallel rank, a few steps in one
process and under the parallelism asked, then each objective's loss, the total and the
gradient norm compared step by step.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from titan_objectives.config import ObjectivesConfigError
from titan_objectives.hosts.common.corpus import DATASET_NAME, corpus_files
from titan_objectives.hosts.common.describe import DEGREES, degrees_of
from titan_objectives.report import load_scalars

# What one process's reference run sets, whatever the command line asks.
ONE_PROCESS = [
    arg
    for key in DEGREES
    for arg in (f"--parallelism.{key}", "-1" if key == "data_parallel_shard_degree" else "1")
]
CHECKPOINT = "checkpoint"


class CheckRunError(RuntimeError):
    """A training run of the check failed; the message names its log."""


@dataclass(frozen=True)
class CheckPlan:
    """What a host reads off its command line for the check."""

    args: list[str]
    """The training command line (``python -m titan_objectives.train`` arguments)."""
    dump_flag: str
    """The flag of the run's output folder (0.2.2 ``--job.dump_folder``)."""
    dataset_flag: str
    """The flag of the dataset path (0.2.2 ``--training.dataset_path``)."""
    dataset: str
    dataset_path: str
    parallelism: object
    """The config's parallelism section (the same key names in both releases)."""


@dataclass(frozen=True)
class Difference:
    tag: str
    largest: float
    """The largest relative difference from one process over the steps."""

    def within(self, tolerance: float) -> bool:
        return self.largest <= tolerance


def model_parallel_degree(parallelism: object) -> int:
    """The ranks that share one batch (tensor, context and pipeline parallel)."""
    degree = 1
    for key in ("tensor_parallel_degree", "context_parallel_degree", "pipeline_parallel_degree"):
        degree *= getattr(parallelism, key)
    return degree


def data_parallel_degree(parallelism: object, nproc: int) -> int:
    """The ranks that read different batches (dp_shard -1: the ranks left over)."""
    shard = parallelism.data_parallel_shard_degree
    replicate = parallelism.data_parallel_replicate_degree
    if shard == -1:
        shard = nproc // (model_parallel_degree(parallelism) * replicate)
    return shard * replicate


def corpus_per_rank(plan: CheckPlan, ranks: int, folder: Path) -> Path:
    """A copy of the corpus per data-parallel rank: rank r reads copy r from its start,
    which is what one process reads first, so the global batch is copies of one process's
    and its mean loss the same."""
    if ranks == 1:
        return Path(plan.dataset_path)
    if plan.dataset != DATASET_NAME or not plan.dataset_path:
        raise ObjectivesConfigError(
            f"check-parallel with {ranks} data-parallel ranks needs the {DATASET_NAME!r} "
            f"dataset with {plan.dataset_flag} (each rank reads its own copy of it, so that "
            f"the ranks see what one process sees); got dataset {plan.dataset!r}"
        )
    files = corpus_files(plan.dataset_path)
    folder.mkdir(parents=True)
    for rank in range(ranks):
        for path in files:
            shutil.copyfile(path, folder / f"copy{rank:03d}_{path.name}")
    return folder


def train(args: list[str], nproc: int, log: Path) -> None:
    """``python -m titan_objectives.train ARGS`` in ``nproc`` processes; its output to
    ``log``. A failed run stops the check, naming the log."""
    if nproc == 1:
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "localhost")
        env.setdefault("MASTER_PORT", "0")
        command = [sys.executable, "-m", "titan_objectives.train", *args]
    else:
        env = dict(os.environ)
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0"]
        command = [*launcher, *rendezvous, "-m", "titan_objectives.train", *args]
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise CheckRunError(f"a training run failed (exit {result.returncode}): see {log}")


def compared_tags(logged: dict) -> list[str]:
    """Each objective's loss, the total loss and the gradient norm, as logged."""
    objectives = sorted(t for t in logged if t.startswith("objectives/") and t.endswith("/loss"))
    totals = [t for t in ("loss_metrics/global_avg_loss", "grad_norm") if t in logged]
    return [*objectives, *totals]


def differences(one: dict, parallel: dict, steps: int) -> list[Difference]:
    rows = []
    for tag in compared_tags(one):
        largest = max(
            abs(parallel[tag][step] - one[tag][step]) / max(abs(one[tag][step]), 1e-12)
            for step in range(1, steps + 1)
        )
        rows.append(Difference(tag, largest))
    return rows


def check_layout(plan: CheckPlan, nproc: int) -> None:
    """The degrees the command line asks multiply to ``nproc``."""
    parallelism = plan.parallelism
    used = data_parallel_degree(parallelism, nproc) * model_parallel_degree(parallelism)
    if nproc < 2 or used != nproc:
        raise ObjectivesConfigError(
            f"check-parallel --nproc {nproc} with parallelism {degrees_of(parallelism)}: "
            "expected at least 2 processes, and parallelism.* degrees whose product is --nproc (a "
            "data_parallel_shard_degree of -1 takes the ranks left over)"
        )


def check_parallel(
    plan: CheckPlan, nproc: int, steps: int, work: Path | None = None
) -> list[Difference]:
    """Seed, one process, ``nproc`` processes; the differences of the logged values.

    Without ``work`` the runs go to a temporary folder, removed afterwards unless a
    training run failed (its error names the log there)."""
    check_layout(plan, nproc)
    if work is not None:
        return train_and_compare(plan, nproc, steps, Path(work))
    temporary = Path(tempfile.mkdtemp(prefix="check-parallel-"))
    try:
        rows = train_and_compare(plan, nproc, steps, temporary)
    except CheckRunError:
        raise  # its log stays, as its message says
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(temporary, ignore_errors=True)
    return rows


def train_and_compare(plan: CheckPlan, nproc: int, steps: int, work: Path) -> list[Difference]:
    """The seed, the one-process run and the ``nproc``-process run, all under ``work``."""
    corpus = corpus_per_rank(plan, data_parallel_degree(plan.parallelism, nproc), work / "corpus")
    logging = ["--metrics.log_freq", "1", "--metrics.enable_tensorboard"]
    checkpoints = ["--checkpoint.enable", "--checkpoint.folder", CHECKPOINT]
    checkpoints += ["--checkpoint.interval", str(10 * steps)]
    common = [*plan.args, plan.dataset_flag, str(corpus), "--training.steps", str(steps)]
    common += [*logging, *checkpoints]
    seed = work / "seed"
    train(
        [*common, *ONE_PROCESS, "--checkpoint.create_seed_checkpoint", plan.dump_flag, str(seed)],
        1,
        work / "seed.log",
    )
    logged = {}
    for name, processes, extra in (("one", 1, ONE_PROCESS), ("parallel", nproc, [])):
        shutil.copytree(seed / CHECKPOINT, work / name / CHECKPOINT)
        train([*common, *extra, plan.dump_flag, str(work / name)], processes, work / f"{name}.log")
        logged[name] = load_scalars(work / name)
    return differences(logged["one"], logged["parallel"], steps)


def report(
    plan: CheckPlan, nproc: int, steps: int, rows: list[Difference], tolerance: float
) -> str:
    """The table ``check-parallel`` prints."""
    degrees = degrees_of(plan.parallelism)
    lines = [
        f"check-parallel: {nproc} processes ({degrees}) against 1 process, {steps} steps "
        "from one seed checkpoint",
        f"{'logged value':<44} {'largest relative difference':>28}",
    ]
    for row in rows:
        verdict = "ok" if row.within(tolerance) else f"FAIL (tolerance {tolerance:.0e})"
        lines.append(f"{row.tag:<44} {row.largest:>28.1e}  {verdict}")
    return "\n".join(lines)
