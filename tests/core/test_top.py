"""TOP against a loop reference written from the paper's formula: for each position, the
first occurrence of each token among the next W labels scores W - d (d = 1 for the next
token), the loss is -sum_v softmax(scores)_v log_softmax(z_t)_v."""

import math

import pytest
import torch

from titan_objectives import Features, ModelInfo, get_objective
from titan_objectives.objectives.top import TOPOptions, top_targets

DIM, VOCAB, BATCH, SEQ = 8, 7, 2, 11  # a tiny vocabulary: tokens repeat inside windows
MODEL = ModelInfo(dim=DIM, n_layers=2, vocab_size=VOCAB, seq_len=SEQ)


def make_top(**options):
    torch.manual_seed(0)
    objective = get_objective("top")(TOPOptions(**options), MODEL)
    objective.init_weights()
    return objective


def make_features(documents=None):
    torch.manual_seed(1)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels[0, 3] = -100
    labels[1, SEQ - 1] = -100
    hidden = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    return Features(labels=labels, final_hidden=hidden, documents=documents)


def reference(objective, features, window):
    """sum over positions with something in their window of the ListNet cross-entropy,
    by explicit loops over positions and distances."""
    labels, documents = features.labels, features.documents
    logits = features.final_hidden @ objective.head.weight.t()
    total, scored = torch.zeros(()), 0
    for b in range(BATCH):
        for t in range(SEQ):
            scores = {}
            for d in range(1, window + 1):
                j = t + d - 1  # labels[:, j] is the token d positions after t
                if j >= SEQ or labels[b, j] == -100:
                    continue
                if documents is not None and documents[b, j] != documents[b, t]:
                    continue
                scores.setdefault(int(labels[b, j]), window - d)  # the nearest occurrence
            if not scores:
                continue
            scored += 1
            norm = math.log(sum(math.exp(s) for s in scores.values()))
            log_p = torch.log_softmax(logits[b, t], dim=-1)
            for v, s in scores.items():
                total = total - math.exp(s - norm) * log_p[v]
    return total, scored


@pytest.mark.parametrize("window", [1, 3, 6, 11, 30])
@pytest.mark.parametrize("chunk_size", [0, 1, 5])
def test_loss_and_gradients_match_the_loop_reference(window, chunk_size):
    objective = make_top(window=window, chunk_size=chunk_size)
    features = make_features()
    out = objective(features)
    expected, scored = reference(objective, features, window)
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-5)
    assert out.metrics["window_tokens"].count == scored
    tensors = [features.final_hidden, objective.head.weight]
    got = torch.autograd.grad(out.loss_sum, tensors)
    want = torch.autograd.grad(expected, tensors)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_packed_documents_keep_windows_inside_their_document():
    documents = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [0] * 6 + [1] * 5])
    objective = make_top(window=5, chunk_size=4)
    features = make_features(documents)
    out = objective(features)
    expected, _ = reference(objective, features, 5)
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-5)
    without = reference(objective, make_features(), 5)[0]
    assert not torch.allclose(expected, without)  # the boundaries matter here


def test_targets_are_sparse_nearest_first_and_normalized():
    labels = torch.tensor([[4, 2, 4, 4, -100, 2, 1]])
    ids, probs = top_targets(labels, window=4)
    assert ids.shape == probs.shape == (1, 7, 4)  # W entries per position, never [.., vocab]
    # Position 0 sees 4, 2, 4, 4: token 4 at distance 1 (score 3), token 2 at 2 (score 2).
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    torch.testing.assert_close(probs[0, 0, :2], expected)
    assert ids[0, 0, :2].tolist() == [4, 2] and probs[0, 0, 2:].sum() == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 7))
    # The last position sees only its own label; an ignored label is skipped.
    assert ids[0, 6, 0] == 1 and probs[0, 6, 0] == 1
    assert (probs[0, 3] > 0).sum() == 3  # 4 (d=1), -100 skipped, 2 (d=3), 1 (d=4)


def test_declarations_and_flops():
    objective = make_top(window=6)
    needs = objective.requirements()
    assert needs.final_hidden and not needs.logits and needs.lookahead == 5  # labels[t .. t + 5]
    assert not needs.output_weight and not needs.whole_vocabulary
    assert objective.flops_per_token() == 6 * VOCAB * DIM + 6 * 6
    assert sum(p.numel() for p in objective.parameters()) == VOCAB * DIM


def test_bad_options_are_named():
    from titan_objectives.objective import OptionError

    with pytest.raises(OptionError, match="window = 0 is not allowed"):
        TOPOptions(window=0).validate(MODEL)
    with pytest.raises(OptionError, match="chunk_size = -1 is not allowed"):
        TOPOptions(chunk_size=-1).validate(MODEL)


def test_a_window_past_the_sequence_is_cut_to_it_with_a_note(caplog):
    import logging

    model = ModelInfo(dim=8, n_layers=2, vocab_size=16, seq_len=12)
    options = TOPOptions(window=100_000)
    with caplog.at_level(logging.WARNING):
        options.validate(model)
    assert "top.window = 100000 is longer than the sequence (12 positions)" in caplog.text
    objective = get_objective("top")(options, model)
    assert objective.requirements().lookahead == 11  # labels[t .. t + 11]
    assert objective.flops_per_token() == 6 * 16 * 8 + 6 * 12
