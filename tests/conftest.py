"""Shared by every suite: tests/core (no torchtitan, run under both hosts' environments)
and each host's tests/hosts/<host>, whose own conftest switches its CPU runtime on."""

import pytest

from tests.helpers import ROOT, long_tests_first
from titan_objectives import config, registry


def pytest_collection_modifyitems(items: list) -> None:
    long_tests_first(items)


def _forget_config_sections() -> None:
    """The [objectives] section class is made once per process, from the registry."""
    config.objectives_section.cache_clear()
    config._job_config.cache_clear()


@pytest.fixture
def clean_registry(monkeypatch):
    """A registry with only the built-ins, restored after the test (the section class
    follows it)."""
    registry.list_objectives()  # load built-ins and installed entry points once
    _forget_config_sections()
    builtins = {
        n: c
        for n, c in registry._objectives.items()
        if registry._sources[n].startswith("module titan_objectives.")
    }
    monkeypatch.setattr(registry, "_objectives", dict(builtins))
    monkeypatch.setattr(registry, "_sources", {n: registry._sources[n] for n in builtins})
    monkeypatch.setattr(registry, "_broken_entry_points", {})
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield registry
    _forget_config_sections()


@pytest.fixture(scope="session")
def twin_corpus(tmp_path_factory):
    """Four identical files: with up to 4 data-parallel ranks each reads its own copy, so
    the global batch is copies of what a single process reads, and the mean loss is the
    same."""
    folder = tmp_path_factory.mktemp("twin")
    text = (ROOT / "assets" / "tiny" / "train.txt").read_text()[:60_000]
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (folder / name).write_text(text)
    return folder
