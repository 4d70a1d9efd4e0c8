"""Reconciling a checkpoint with the current model and stack (checkpoints written here)."""

import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp

from titan_objectives.hosts.common.checkpoint_state import (
    CheckpointMismatchError,
    _WithoutKeys,
    objective_of,
    reconcile,
)


@pytest.fixture
def checkpoint(tmp_path):
    state = {
        "layers.0.w": torch.randn(4, 4),
        "objectives.nitp.projector.weight": torch.randn(4, 4),
        "objectives.old.head.weight": torch.randn(2, 4),
        "optimizer": {"state.layers.0.w.exp_avg": torch.ones(())},  # a training checkpoint
    }
    dcp.save(state, checkpoint_id=str(tmp_path))
    return str(tmp_path)


class FakeOptimizer:
    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"state.layers.0.w.exp_avg": 1, "state.objectives.mtp.p.exp_avg": 2}

    def load_state_dict(self, state_dict):
        self.loaded = state_dict


def test_objective_of():
    assert objective_of("objectives.nitp.projector.w1.weight") == "nitp"
    assert objective_of("optimizer.state.objectives.mtp.depths.0.x.exp_avg") == "mtp"
    assert objective_of("layers.0.attention.wq.weight") is None


def test_new_objectives_keep_their_init_and_old_ones_are_ignored(checkpoint, caplog):
    optimizer = FakeOptimizer()
    states = {
        "layers.0.w": torch.zeros(4, 4),
        "objectives.nitp.projector.weight": torch.zeros(4, 4),
        "objectives.mtp.p": torch.zeros(3),
        "optimizer": optimizer,
    }
    with caplog.at_level(logging.INFO):
        fitted = reconcile(states, checkpoint)
    assert "objectives.mtp.p" not in fitted and "objectives.nitp.projector.weight" in fitted
    assert "no state for objective(s) mtp" in caplog.text
    assert "holds state for objective(s) old, which the stack no longer has: ignored" in caplog.text
    # The optimizer never asks the checkpoint for mtp's state, and keeps its own.
    wrapped = fitted["optimizer"]
    assert isinstance(wrapped, _WithoutKeys)
    assert wrapped.state_dict() == {"state.layers.0.w.exp_avg": 1}
    wrapped.load_state_dict({"state.layers.0.w.exp_avg": 5})
    assert optimizer.loaded == {"state.layers.0.w.exp_avg": 5, "state.objectives.mtp.p.exp_avg": 2}


def test_resuming_from_a_model_only_save_names_the_cause(tmp_path):
    dcp.save({"layers.0.w": torch.randn(4, 4)}, checkpoint_id=str(tmp_path))
    states = {"layers.0.w": torch.zeros(4, 4), "optimizer": FakeOptimizer()}
    with pytest.raises(CheckpointMismatchError, match=r"holds the model only, not the optimizer"):
        reconcile(states, str(tmp_path))
    reconcile({"layers.0.w": torch.zeros(4, 4)}, str(tmp_path))  # a model-only load is fine


def test_shape_mismatches_are_named(checkpoint):
    with pytest.raises(
        CheckpointMismatchError,
        match=r"model tensor 'layers.0.w' has shape "
        r"\(4, 4\) there and \(4, 8\) in this config \(another flavor\?\)",
    ):
        reconcile({"layers.0.w": torch.zeros(4, 8)}, checkpoint)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"objective 'nitp' module "
        r"'objectives.nitp.projector.weight' has shape \(4, 4\) there and \(8, 4\)",
    ):
        reconcile({"objectives.nitp.projector.weight": torch.zeros(8, 4)}, checkpoint)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"has no 'layers.1.w': it was written for "
        r"another model or flavor",
    ):
        reconcile({"layers.1.w": torch.zeros(4, 4)}, checkpoint)
