"""The layers: the core (contract, registry, stack, objectives, losses, metrics, sequence
shards, report), the runtime the hosts share (``hosts/common``) and the core's tests never
import torchtitan: only the per-release host subpackages do."""

import ast
import subprocess
import sys

from tests.helpers import ROOT

PACKAGE = ROOT / "titan_objectives"
HOSTS = ("hosts/torchtitan_0_2/", "hosts/torchtitan_0_3/")


def imported_modules(path, anywhere: bool = False) -> set[str]:
    """Modules a file imports when it is imported, or ``anywhere`` in it, functions
    included (the core's entry points import a host inside functions, when called)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree) if anywhere else tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_host_subpackages_import_torchtitan():
    """hosts/common not even inside a function: each host imports its own torchtitan."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(HOSTS):
            continue
        modules = imported_modules(path, anywhere=relative.startswith("hosts/common/"))
        hosts = {m for m in modules if m.startswith("titan_objectives.hosts.torchtitan_")}
        if any(m == "torchtitan" or m.startswith("torchtitan.") for m in modules) or hosts:
            offenders.append(relative)
    assert offenders == []


def _loaded_torchtitan_modules(modules: list[str]) -> list[str]:
    code = "import sys, importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchtitan'))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return result.stdout.strip()


def test_importing_the_core_the_runtime_and_the_core_tests_loads_no_torchtitan():
    core = [
        "titan_objectives",
        "titan_objectives.objectives",
        "titan_objectives.losses",
        "titan_objectives.metrics",
        "titan_objectives.config",
        "titan_objectives.report",
        "titan_objectives.stack",
        "titan_objectives.sequence",
        "titan_objectives.vocabulary",
        "titan_objectives.cli",
        "titan_objectives.train",
    ]
    common = [
        f"titan_objectives.hosts.common.{p.stem}"
        for p in (PACKAGE / "hosts" / "common").glob("*.py")
        if p.stem != "__init__"
    ]
    tests = [f"tests.core.{p.stem}" for p in (ROOT / "tests" / "core").glob("test_*.py")]
    assert _loaded_torchtitan_modules([*core, *common, *tests]) == "[]"


def test_importing_the_config_discovers_no_objective():
    code = (
        "import titan_objectives.config, titan_objectives.registry as r; "
        "print(r._entry_points_loaded, sorted(r._objectives))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "False []"
