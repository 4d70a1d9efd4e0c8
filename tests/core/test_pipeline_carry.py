"""Which layers each pipeline stage receives and sends beside its hidden state."""

import pytest

from titan_objectives.hosts.common.pipeline import StageCarry

N_LAYERS = 6  # hidden states 0 (embeddings) .. 6 (block 6)


def plans(stages: list[list[int]], carried: set[int]) -> list[StageCarry]:
    last = len(stages) - 1
    return [
        StageCarry.plan(held, frozenset(carried), index == last, N_LAYERS)
        for index, held in enumerate(stages)
    ]


@pytest.mark.parametrize(
    "stages",
    [
        [[0, 1, 2, 3], [4, 5, 6]],
        [[0, 1], [2, 3], [4, 5], [6]],
        [[0], [1, 2, 3], [4, 5, 6], []],  # a last stage of only the final norm and head
    ],
)
@pytest.mark.parametrize("carried", [set(), {0}, {0, 2}, {0, 2, 5}, {3, 6}])
def test_every_carried_layer_reaches_the_last_stage_once(stages, carried):
    """Each boundary passes what the next stage expects; the last stage gets every
    layer it reads from an earlier stage (carried, or as its input hidden state) and
    holds the rest."""
    planned = plans(stages, carried)
    for before, after in zip(planned, planned[1:], strict=False):
        assert before.sends == after.receives
    last = planned[-1]
    reached = set(last.receives) | {last.input_layer} - {None} | set(stages[-1])
    assert carried <= reached
    assert len(last.receives) == len(set(last.receives))
    assert last.sends == ()


def test_a_stage_s_last_block_output_is_the_next_stage_s_input_not_a_copy():
    first, second = plans([[0, 1, 2, 3], [4, 5, 6]], {0, 3})
    assert first.sends == (0,)  # layer 3 leaves as the hidden state itself
    assert (second.receives, second.input_layer) == ((0,), 3)
