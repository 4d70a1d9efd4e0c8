"""NITP against a formula written here, independently of the objective's code."""

import math

import pytest
import torch

from titan_objectives import Features, ModelInfo, get_objective
from titan_objectives.objectives.nitp import NITPOptions

DIM, LAYERS, BATCH, SEQ = 8, 6, 2, 7
MODEL = ModelInfo(dim=DIM, n_layers=LAYERS, vocab_size=32, seq_len=SEQ)


def make_nitp(**options):
    torch.manual_seed(0)
    objective = get_objective("nitp")(NITPOptions(**options), MODEL)
    objective.init_weights()
    return objective


def reference_loss(objective, final_hidden, target_hidden, labels, kind, documents=None):
    """sum over t < S-1 with labels[t] != -100 (and t, t+1 in one document) of
    d(P(h_t), z_{t+1}), by explicit loops."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(final_hidden.shape[0]):
        for t in range(final_hidden.shape[1] - 1):
            if labels[b, t] == -100:
                continue
            if documents is not None and documents[b, t] != documents[b, t + 1]:
                continue
            p = objective.projector(final_hidden[b, t]).double()
            z = target_hidden[b, t + 1].double()
            if kind == "cosine":
                d = 1 - (p @ z) / (p.norm() * z.norm())
            elif kind == "mse":
                d = ((p - z) ** 2).mean()
            else:  # smooth_l1 with beta = 1
                diff = (p - z).abs()
                d = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
            total = total + d
    return total


def random_features(target_layer, requires_grad=False):
    torch.manual_seed(1)
    final = torch.randn(BATCH, SEQ, DIM, requires_grad=requires_grad)
    target = torch.randn(BATCH, SEQ, DIM, requires_grad=requires_grad)
    labels = torch.randint(0, 32, (BATCH, SEQ))
    labels[0, 2] = -100
    labels[1, 0] = -100
    return Features(labels=labels, final_hidden=final, layers={target_layer: target})


@pytest.mark.parametrize("projector", ["swiglu", "linear", "none"])
@pytest.mark.parametrize("kind", ["cosine", "smooth_l1", "mse"])
def test_loss_matches_reference_formula(projector, kind):
    objective = make_nitp(projector=projector, loss=kind, target_layer=3)
    features = random_features(3)
    out = objective(features)
    expected = reference_loss(
        objective, features.final_hidden, features.layers[3], features.labels, kind
    )
    torch.testing.assert_close(out.loss_sum.double(), expected, rtol=1e-5, atol=1e-6)


def test_packed_documents_pair_no_positions_across_a_boundary():
    """Under block-causal masks the target at t+1 must be in t's document: documents end
    mid-sequence (after positions 1 and 4 in row 0, 3 in row 1)."""
    objective = make_nitp(target_layer=2)
    features = random_features(2, requires_grad=True)
    features.documents = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, 1]])
    out = objective(features)
    expected = reference_loss(
        objective,
        features.final_hidden,
        features.layers[2],
        features.labels,
        "cosine",
        features.documents,
    )
    torch.testing.assert_close(out.loss_sum.double(), expected, rtol=1e-5, atol=1e-6)
    # 12 pairs in one document, less the two ignored labels (row 0 at 2, row 1 at 0).
    assert out.metrics["cosine"].count == BATCH * (SEQ - 1) - 3 - 2
    out.loss_sum.backward()
    # A document's last position predicts nothing: no gradient reaches it.
    assert features.final_hidden.grad[0, [1, 4]].abs().sum() == 0
    assert features.final_hidden.grad[1, 3].abs().sum() == 0


def test_cosine_metric_is_mean_over_scored_positions():
    objective = make_nitp(target_layer=1)
    features = random_features(1)
    out = objective(features)
    valid = (features.labels[:, :-1] != -100).sum()
    cos = out.metrics["cosine"]
    assert cos.count == valid == BATCH * (SEQ - 1) - 2
    # With the cosine distance, sum(1 - cos) = count - sum(cos).
    torch.testing.assert_close(out.loss_sum, cos.count - cos.total)


def test_no_gradient_reaches_the_target_path():
    objective = make_nitp(target_layer=2)
    features = random_features(2, requires_grad=True)
    objective(features).loss_sum.backward()
    assert features.layers[2].grad is None
    assert features.final_hidden.grad is not None and features.final_hidden.grad.abs().sum() > 0
    assert all(p.grad is not None for p in objective.parameters())


def test_shallow_block_gets_no_gradient_through_the_target():
    # Real use: z comes from a shallow block of the very network that produces h. With h
    # cut from z, the only path from the loss into `shallow` is the target: it must be cut.
    torch.manual_seed(0)
    shallow = torch.nn.Linear(DIM, DIM)
    deep = torch.nn.Linear(DIM, DIM)
    z = shallow(torch.randn(BATCH, SEQ, DIM))
    h = deep(z.detach())
    objective = make_nitp(target_layer=1)
    labels = torch.zeros(BATCH, SEQ, dtype=torch.long)
    objective(Features(labels=labels, final_hidden=h, layers={1: z})).loss_sum.backward()
    assert shallow.weight.grad is None
    assert deep.weight.grad.abs().sum() > 0


def test_ignored_positions_contribute_nothing():
    objective = make_nitp(target_layer=1)
    features = random_features(1, requires_grad=True)
    base = objective(features).loss_sum
    # Change everything at an ignored position t (prediction side) and at t+1 (its target):
    changed = Features(
        labels=features.labels,
        final_hidden=features.final_hidden.detach().clone(),
        layers={1: features.layers[1].detach().clone()},
    )
    changed.final_hidden[0, 2] = 100.0
    changed.layers[1][0, 3] = -50.0
    torch.testing.assert_close(objective(changed).loss_sum, base.detach())
    base.backward()
    assert features.final_hidden.grad[0, 2].abs().sum() == 0
    assert features.final_hidden.grad[1, 0].abs().sum() == 0


def test_last_position_has_no_target():
    objective = make_nitp(target_layer=1)
    features = random_features(1, requires_grad=True)
    objective(features).loss_sum.backward()
    assert features.final_hidden.grad[:, -1].abs().sum() == 0
    # ...and the first position is never a target.
    changed = features.layers[1].detach().clone()
    changed[:, 0] = 7.0
    out = objective(
        Features(labels=features.labels, final_hidden=features.final_hidden, layers={1: changed})
    )
    torch.testing.assert_close(out.loss_sum, objective(features).loss_sum)


@pytest.mark.parametrize(
    ("n_layers", "expected"), [(24, 5), (28, 6), (17, 4), (6, 2), (12, 3), (2, 1), (1, 0)]
)
def test_default_target_layer_is_paper_rule(n_layers, expected):
    model = ModelInfo(dim=DIM, n_layers=n_layers, vocab_size=32, seq_len=SEQ)
    assert NITPOptions().resolved_target_layer(model) == expected
    assert expected == min(n_layers - 1, max(1, math.ceil(0.2 * n_layers)))


def test_swiglu_projector_shape_and_parameter_count():
    objective = make_nitp()
    assert sum(p.numel() for p in objective.parameters()) == 12 * DIM * DIM
    assert objective.projector(torch.randn(3, DIM)).shape == (3, DIM)
    assert sum(p.numel() for p in make_nitp(projector="linear").parameters()) == DIM * DIM
    assert list(make_nitp(projector="none").parameters()) == []


def test_requirements():
    req = make_nitp(target_layer=0).requirements()
    assert req.final_hidden and not req.logits and req.layers == frozenset({0})


def test_cosine_uses_fp32_for_bf16_inputs():
    objective = make_nitp(target_layer=1, projector="none")
    features = random_features(1)
    bf16 = Features(
        labels=features.labels,
        final_hidden=features.final_hidden.bfloat16(),
        layers={1: features.layers[1].bfloat16()},
    )
    out = objective(bf16)
    assert out.loss_sum.dtype == torch.float32
    a = bf16.final_hidden[:, :-1].float()
    b = bf16.layers[1][:, 1:].float()
    valid = features.labels[:, :-1] != -100
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    expected = ((1 - cos) * valid).sum()
    torch.testing.assert_close(out.loss_sum, expected)


def test_recomputed_projector_gives_the_same_loss_and_gradients_keeping_less():
    def run(recompute):
        objective = make_nitp(target_layer=3)
        if recompute:
            objective.checkpoint_activations()
        features = random_features(3, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = objective(features).loss_sum
        loss.backward()
        grads = [features.final_hidden.grad, *(p.grad for p in objective.parameters())]
        return loss.detach(), grads, sum(t.numel() for t in saved)

    loss, grads, kept = run(recompute=False)
    recomputed_loss, recomputed_grads, recomputed_kept = run(recompute=True)
    torch.testing.assert_close(recomputed_loss, loss)
    for recomputed, plain in zip(recomputed_grads, grads, strict=True):
        torch.testing.assert_close(recomputed, plain)
    # The three [tokens, 4d] activations of the SwiGLU projector are no longer kept.
    assert kept - recomputed_kept >= 3 * BATCH * SEQ * 4 * DIM
