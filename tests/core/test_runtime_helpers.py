"""The runtime's small helpers: reading a flag off a command line, giving a live object a
mixin."""

import pytest

from titan_objectives.config import ObjectivesConfigError
from titan_objectives.hosts.common.argv import flag_value, without_flag
from titan_objectives.hosts.common.extend import extend

FLAG = ("--objectives.toml",)


@pytest.mark.parametrize(
    ("argv", "value", "rest"),
    [
        (["--a", "1", "--objectives.toml", "x.toml", "--b"], "x.toml", ["--a", "1", "--b"]),
        (["--objectives.toml=y.toml", "--b", "2"], "y.toml", ["--b", "2"]),
        (["--objectives.toml", "x", "--objectives.toml", "z"], "z", []),
        (["--b", "2"], None, ["--b", "2"]),
    ],
)
def test_a_flag_is_read_in_both_spellings_and_left_out(argv, value, rest):
    assert flag_value(argv, FLAG) == value
    assert without_flag(argv, FLAG) == rest


def test_a_flag_without_its_value_is_named():
    with pytest.raises(ObjectivesConfigError, match="--objectives.toml needs a value"):
        flag_value(["--a", "--objectives.toml"], FLAG)


class Counter:
    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> int:
        self.steps += 1
        return self.steps


class Doubling:
    def step(self) -> int:
        super().step()
        return super().step()


def test_a_mixin_wraps_the_live_objects_methods_once():
    counter = Counter()
    counter.step()
    extend(counter, Doubling)
    extend(counter, Doubling)  # a second time changes nothing
    assert isinstance(counter, Counter) and isinstance(counter, Doubling)
    assert counter.step() == 3 and counter.steps == 3
    other = Counter()
    extend(other, Doubling)
    assert type(other) is type(counter)  # one class per (class, mixin)


def test_unsplit_parameters_are_those_no_parameter_style_reaches():
    from torch import nn
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        SequenceParallel,
    )

    from titan_objectives.hosts.common.checks import unsplit_parameters

    class Block(nn.Module):  # stands for a block of the model's kind
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)

    objective = nn.Module()
    objective.heads = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    objective.norm = nn.LayerNorm(2)
    objective.gate = nn.Linear(2, 2)
    objective.block = Block()
    plan = {"heads.*": ColwiseParallel(), "gate": PrepareModuleInput()}
    assert unsplit_parameters(objective, plan, Block) == [
        "norm.weight",
        "norm.bias",
        "gate.weight",
        "gate.bias",
    ]
    plan |= {"norm": SequenceParallel(), "gate": ColwiseParallel()}
    assert unsplit_parameters(objective, plan, Block) == []
    assert unsplit_parameters(objective, plan, None) == ["block.inner.weight", "block.inner.bias"]
