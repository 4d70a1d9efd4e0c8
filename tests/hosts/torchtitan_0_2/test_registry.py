"""The registry: built-ins, duplicates, and third-party objectives through entry points."""

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import DEBUG_CONFIG, ROOT, pip_install, scalars, train
from titan_objectives import (
    ModelInfo,
    Objective,
    ObjectiveOptions,
    ObjectiveOutput,
    Requirements,
)
from titan_objectives.config import ObjectivesConfigError, resolve_stack
from titan_objectives.registry import RegistryError

PLUGIN = ROOT / "tests" / "plugin_fixture"


@pytest.fixture(scope="session")
def installed_plugin(tmp_path_factory) -> Path:
    """tiny_plugin, installed by pip (build + dist-info + entry_points.txt) into a folder."""
    target = pip_install(PLUGIN, tmp_path_factory.mktemp("site"))
    assert (target / "tiny_plugin-0.1.dist-info" / "entry_points.txt").is_file()
    return target


def test_builtins_are_registered(clean_registry):
    objectives = clean_registry.list_objectives()
    assert {"ntp", "nitp"} <= set(objectives)
    assert objectives["nitp"].name == "nitp"
    assert clean_registry.objective_source("ntp") == "module titan_objectives.objectives.ntp"


def test_unknown_name_lists_registered(clean_registry):
    with pytest.raises(RegistryError, match=r"unknown objective 'nope'; registered objectives: "):
        clean_registry.get_objective("nope")


def test_registering_a_name_twice_names_both_sources(clean_registry):
    class Other(Objective):
        pass

    with pytest.raises(RegistryError) as error:
        clean_registry.add_objective("nitp", Other, "entry point 'x:Other' of x-pkg")
    message = str(error.value)
    assert "module titan_objectives.objectives.nitp" in message
    assert "entry point 'x:Other' of x-pkg" in message


@pytest.mark.parametrize("name", ["not-an-identifier", "class", "stack", "9lives"])
def test_names_must_be_usable_as_toml_keys_and_flags(clean_registry, name):
    with pytest.raises(RegistryError, match="must be a Python identifier"):
        clean_registry.add_objective(name, Objective, "test")


def test_decorator_registers(clean_registry):
    @dataclass
    class DoubledOptions(ObjectiveOptions):
        scale: float = 2.0

    @clean_registry.register_objective("doubled")
    class Doubled(Objective):
        Options = DoubledOptions

        def requirements(self):
            return Requirements(logits=True)

        def forward(self, features):
            return ObjectiveOutput(features.logits.sum() * self.options.scale)

    assert clean_registry.get_objective("doubled") is Doubled
    assert clean_registry.objective_source("doubled") == f"module {__name__}"


def test_entry_points_are_discovered(clean_registry, installed_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_plugin))
    objectives = clean_registry.list_objectives()
    assert "hidden_rms" in objectives
    assert clean_registry.objective_source("hidden_rms") == (
        "entry point 'tiny_plugin:HiddenRMS' of tiny-plugin"
    )
    # The broken ones fail alone, each with its reason.
    broken = clean_registry.broken_entry_points()
    assert "ModuleNotFoundError" in broken["broken_import"]
    assert "not a subclass of titan_objectives.Objective" in broken["not_an_objective"]
    with pytest.raises(RegistryError, match="broken_import.*unavailable.*failed to import"):
        clean_registry.get_objective("broken_import")
    assert clean_registry.get_objective("ntp").name == "ntp"

    cls = objectives["hidden_rms"]
    from titan_objectives import Features, ModelInfo

    objective = cls(
        cls.Options(target_rms=2.0), ModelInfo(dim=4, n_layers=2, vocab_size=8, seq_len=3)
    )
    hidden = torch.ones(1, 3, 4)  # rms 1 everywhere
    labels = torch.tensor([[1, -100, 2]])
    out = objective(Features(labels=labels, final_hidden=hidden))
    assert out.loss_sum.item() == pytest.approx(2.0)  # two scored positions, (1 - 2)^2 each


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "broken_import",
            "entry point 'tiny_plugin.missing_module:Anything' of tiny-plugin "
            "failed to import: ModuleNotFoundError",
        ),
        ("not_an_objective", "entry point 'tiny_plugin:NotAnObjective' of tiny-plugin is "),
    ],
)
def test_a_broken_entry_point_in_the_stack_is_named(
    clean_registry, installed_plugin, monkeypatch, name, message
):
    monkeypatch.syspath_prepend(str(installed_plugin))
    section = SimpleNamespace(stack=["ntp", name], nonfinite="error")
    with pytest.raises(ObjectivesConfigError) as error:
        resolve_stack(section, ModelInfo(dim=4, n_layers=2, vocab_size=8, seq_len=3))
    assert message in str(error.value)
    assert str(error.value).startswith(f"objectives.stack: objective {name!r} is unavailable")


@pytest.mark.slow
def test_entry_point_objective_trains_from_a_toml_stack(tmp_path, installed_plugin):
    config = tmp_path / "plugin.toml"
    text = DEBUG_CONFIG.read_text().replace(
        'stack = ["ntp", "nitp"]',
        'stack = ["ntp", "hidden_rms"]\n\n[objectives.hidden_rms]\ntarget_rms = 2.0',
    )
    config.write_text(text)
    result = train(
        tmp_path / "out",
        "--objectives.hidden_rms.weight",
        "0.05",
        config=config,
        extra_pythonpath=str(installed_plugin),
    )
    assert "hidden_rms:" in result.stdout
    tb = scalars(tmp_path / "out")
    assert list(tb["objectives/hidden_rms/weight"].values()) == pytest.approx([0.05] * 5)
    # At init the final RMSNorm (weight 1) gives rms 1: the loss is (1 - 2)^2 per token.
    assert tb["objectives/hidden_rms/loss"][1] == pytest.approx(1.0, rel=1e-3)
    step = 5
    assert tb["loss_metrics/global_avg_loss"][step] == pytest.approx(
        tb["objectives/ntp/loss"][step] + 0.05 * tb["objectives/hidden_rms/loss"][step], rel=1e-5
    )


def test_help_spells_objectives_as_registered_and_both_spellings_parse(installed_plugin):
    import os
    import subprocess
    import sys

    from torchtitan.config import ConfigManager

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "titan_objectives.train",
            "--job.config_file",
            str(DEBUG_CONFIG),
            "--help",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(installed_plugin), RANK="0"),
    )
    help_text = " ".join(result.stdout.split())
    assert "--objectives.hidden_rms.target_rms" in help_text
    assert "--objectives.geometry.max_tokens" in help_text and "max-tokens" not in help_text
    for flag in ("--objectives.geometry.max_tokens", "--objectives.geometry.max-tokens"):
        parsed = ConfigManager().parse_args(["--job.config_file", str(DEBUG_CONFIG), flag, "300"])
        assert parsed.objectives.geometry.max_tokens == 300
