"""The torchtitan 0.3 host's suite (run in .venv-tt03: ``TORCHTITAN=0.3 ./scripts/test.sh``).
The CPU runtime is switched on before anything imports torchtitan."""

from titan_objectives.hosts.torchtitan_0_3.runtime import cpu

cpu.activate()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The subprocess and TensorBoard helpers of the 0.2.2 suite (no torchtitan imports).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import long_tests_first  # noqa: E402


def pytest_collection_modifyitems(items: list) -> None:
    long_tests_first(items)


@pytest.fixture(scope="session")
def twin_corpus(tmp_path_factory):
    """Two identical files: with 2 data-parallel ranks each reads its own copy, so the
    global batch is copies of what a single process reads, and the mean loss is the same."""
    from helpers import ROOT

    folder = tmp_path_factory.mktemp("twin")
    text = (ROOT / "assets" / "tiny" / "train.txt").read_text()[:60_000]
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(text)
    return folder
