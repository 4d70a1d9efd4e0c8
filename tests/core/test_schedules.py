import pytest

from titan_objectives import ModelInfo, ObjectiveOptions, OptionError
from titan_objectives.objectives.mtp import MTPOptions

MODEL = ModelInfo(dim=8, n_layers=4, vocab_size=16, seq_len=32)


def test_constant():
    options = ObjectiveOptions(weight=0.7)
    assert [options.weight_at(s) for s in (1, 100, 10**6)] == [0.7, 0.7, 0.7]


def test_linear_warmup():
    options = ObjectiveOptions(weight=2.0, schedule="linear_warmup", warmup_steps=4)
    options.validate(MODEL)
    assert [options.weight_at(s) for s in (1, 2, 4, 5, 50)] == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_deepseek_v3_step_switch():
    options = MTPOptions(schedule="step", switch_step=10, weight_after=0.1)
    options.validate(MODEL)
    assert options.weight == 0.3  # DeepSeek-V3's lambda is the mtp default
    assert [options.weight_at(s) for s in (1, 9, 10, 11)] == [0.3, 0.3, 0.1, 0.1]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"schedule": "linear_warmup"}, "warmup_steps"),
        ({"schedule": "step", "weight_after": 0.1}, "switch_step"),
        ({"schedule": "step", "switch_step": 5}, "weight_after"),
        ({"schedule": "step", "switch_step": 5, "weight_after": -1.0}, "weight_after"),
    ],
)
def test_a_schedule_missing_its_parameters_is_an_error(options, key):
    with pytest.raises(OptionError) as error:
        ObjectiveOptions(**options).validate(MODEL)
    assert error.value.option == key
