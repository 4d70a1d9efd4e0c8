"""Run real torchtitan trainings in subprocesses and read back what they logged."""

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.tensor import DTensor

from titan_objectives.config import StackEntry
from titan_objectives.objective import ModelInfo, ObjectiveOptions
from titan_objectives.registry import get_objective
from titan_objectives.report import load_scalars as scalars  # noqa: F401 (tests import it here)
from titan_objectives.stack import ObjectiveStack

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "toml_configs" / "llama3_debug_nitp.toml"

# Small enough for seconds per run on 2 CPU cores; every step logged.
TINY = [
    "--training.seq_len",
    "64",
    "--training.local_batch_size",
    "4",
    "--training.steps",
    "5",
    "--lr_scheduler.warmup_steps",
    "2",
    "--metrics.log_freq",
    "1",
    "--metrics.disable_color_printing",
    "--debug.seed",
    "42",
]


def stack_of(
    options: dict[str, ObjectiveOptions], model: ModelInfo, stack_class: type = ObjectiveStack
) -> ObjectiveStack:
    """The stack of these objectives (by registered name), built on the current device."""
    entries = {name: StackEntry(get_objective(name), opts) for name, opts in options.items()}
    return stack_class.build(entries, model, "the test model")


def assert_seam_exists_and_is_used(host: str, module: str, attribute: str, user: str) -> None:
    """A host's private seam (``seams.PRIVATE_SEAMS``): the attribute still exists in
    torchtitan or torch, and the module of ours listed as its user names it."""
    import importlib

    value = importlib.import_module(module)
    for part in attribute.split("."):
        assert hasattr(value, part), f"{module}.{attribute} is gone"
        value = getattr(value, part)
    source = (ROOT / "titan_objectives" / "hosts" / host / f"{user}.py").read_text()
    assert attribute.split(".")[-1] in source, (module, attribute, user)


def long_tests_first(items: list) -> None:
    """Collection order for ``pytest_collection_modifyitems``: tests marked ``long`` first
    (pytest-xdist hands tests out in this order: one started last would run alone)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def train(
    dump_folder: Path,
    *overrides: str,
    config: Path = DEBUG_CONFIG,
    nproc: int = 1,
    module: str = "titan_objectives.train",
    **torchrun_kwargs,
) -> subprocess.CompletedProcess:
    """torchrun a torchtitan 0.2.2 training of a TOML config, at the TINY sizes."""
    return torchrun(
        [
            module,
            "--job.config_file",
            str(config),
            "--job.dump_folder",
            str(dump_folder),
            *TINY,
            *overrides,
        ],
        nproc=nproc,
        **torchrun_kwargs,
    )


# What torchrun gives its only worker. MASTER_PORT 0: rank 0's store binds a free port,
# and no other rank needs to find it.
ONE_WORKER = {
    "RANK": "0",
    "LOCAL_RANK": "0",
    "GROUP_RANK": "0",
    "ROLE_RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_WORLD_SIZE": "1",
    "ROLE_WORLD_SIZE": "1",
    "MASTER_ADDR": "localhost",
    "MASTER_PORT": "0",
}


def threads_per_rank(nproc: int) -> int:
    """This test process's share of the cores (``OMP_NUM_THREADS``, which scripts/test.sh
    sets to the cores per test process; else the cores over pytest-xdist's processes),
    split among ``nproc`` ranks: more threads than cores slow every run down."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if not threads.isdigit():
        processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        threads = str((os.cpu_count() or 1) // processes)
    return max(1, int(threads) // nproc)


def torchrun(
    module_args: list[str],
    nproc: int = 1,
    extra_pythonpath: str | None = None,
    timeout: int = 600,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``torchrun -m MODULE ARGS``; returns the finished process (stdout and stderr merged).

    One process runs as torchrun's only worker would, without the launcher: the launcher
    costs about 3 s of imports per run on 2 cores, and the suite runs dozens. A failing
    run's exit code is then the worker's own. Every worker runs through ``tests.launch``
    (no sleep after the last step)."""
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(threads_per_rank(nproc)),
        **(env or {}),
    )
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_pythonpath, env.get("PYTHONPATH")]))
    if nproc == 1:
        env.update(ONE_WORKER)
        command = [sys.executable, "-m", "tests.launch", *module_args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            "localhost:0",
            "--local-ranks-filter",
            "0",
            "--role",
            "rank",
            "--tee",
            "3",
            "-m",
            "tests.launch",
            *module_args,
        ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


def save_whole_gradients(parts: list[torch.nn.Module], names: Iterable[str], folder: str) -> None:
    """Each rank saves the whole gradients of those of ``names`` its model parts (its
    pipeline stages) have, named as a checkpoint names them (without compile's and AC's
    wrappers), to ``folder/gradients.<rank>.pt``; sharded ones are gathered by every rank
    that holds a shard."""
    whole = {}
    for part in parts:
        parameters = {
            re.sub(r"\.(_orig_mod|_checkpoint_wrapped_module)", "", name): parameter
            for name, parameter in part.named_parameters()
        }
        for name in (n for n in names if n in parameters):
            grad = parameters[name].grad
            whole[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()
    torch.save(whole, f"{folder}/gradients.{torch.distributed.get_rank()}.pt")


def saved_gradients(folder: Path) -> dict[str, torch.Tensor]:
    """The whole gradients every rank of a run saved (``save_whole_gradients``)."""
    gradients = {}
    for path in sorted(folder.glob("gradients.*.pt")):
        gradients.update(torch.load(path))
    return gradients


def expert_biases(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The MoE routers' load-balancing biases in a DCP checkpoint (torchtitan 0.2.2 names
    them ``expert_bias``, 0.3 ``expert_bias_E``)."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    names = [k for k in metadata if k.endswith(("expert_bias", "expert_bias_E"))]
    state = {k: torch.zeros(metadata[k].size) for k in names}
    dcp.load(state, checkpoint_id=str(checkpoint))
    return state


def assert_same_numbers(
    logged: dict, tags: tuple[str, ...], steps: int, scale: dict | None = None, absolute: float = 0
) -> None:
    """Every run's ``tags`` equal the single-process ones (times ``scale[(run, tag)]``) to
    1e-4 relative, or ``absolute``."""
    one, scale = logged["one"], scale or {}
    for name, run in logged.items():
        expected = {
            tag: {step: one[tag][step] * scale.get((name, tag), 1) for step in one[tag]}
            for tag in tags
        }
        worst = max(
            abs(run[tag][step] / expected[tag][step] - 1)
            for tag in tags
            for step in range(1, steps + 1)
        )
        print(f"{name}: largest relative difference from one process {worst:.1e}")
        for tag in tags:
            for step in range(1, steps + 1):
                close = pytest.approx(expected[tag][step], rel=1e-4, abs=absolute)
                assert run[tag][step] == close, (name, tag, step)


def assert_gradients_within(folder: Path, runs: list[str], share: float) -> None:
    """The whole gradients a trainer probe saved at step 1 (``save_whole_gradients``:
    embedding, a block, final norm, head, NITP projector, MTP projection, TOP head) equal
    one process's to ``share`` of each tensor's largest entry."""
    one = saved_gradients(folder / "one")
    for name in runs:
        gradients = saved_gradients(folder / name)
        for key, expected in one.items():
            worst = (gradients[key] - expected).abs().max().item() / expected.abs().max().item()
            print(f"{name} {key}: largest difference / largest gradient {worst:.1e}")
            assert worst < share, (name, key, worst)


def run_module(module: str, *args: str, timeout: int = 120, env: dict | None = None):
    """Run ``python -m module args`` without torchrun (for config errors)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def pip_install(package: Path, target: Path) -> Path:
    """Install a package (and its entry points) with pip into a folder, as a user would
    with ``pip install``; return the folder, to put on ``sys.path`` / ``PYTHONPATH``.
    pip builds from a copy beside the folder: setuptools builds in the source tree, which
    parallel test processes installing the same package would share."""
    source = target.parent / f"{target.name}-source"
    shutil.copytree(package, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
    )
    return target


def needs_pytorch_kernel(overrides) -> bool:
    """Whether a command line forces PyTorch's linear_cross_entropy (``ce_backend torch``),
    which torch < 2.13 (the GPU image's 2.11) does not have."""
    from titan_objectives.losses import torch_has_linear_cross_entropy

    args = list(overrides)
    pairs = zip(args, args[1:], strict=False)
    forced = any(a.endswith(".ce_backend") and b == "torch" for a, b in pairs)
    return forced and not torch_has_linear_cross_entropy()
