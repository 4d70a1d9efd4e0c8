"""MTP against explicit per-depth loops with F.cross_entropy on hand-shifted labels."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titan_objectives import Features, ModelInfo, get_objective
from titan_objectives.objectives.mtp import MTPOptions

DIM, VOCAB, BATCH, SEQ, LAYERS = 8, 13, 2, 9, 3


class CausalBlock(nn.Module):
    """A tiny causal block: each position mixes in the mean of the positions up to it."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.mix = nn.Linear(DIM, DIM)

    def forward(self, x):
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        return x + torch.tanh(self.mix(x.cumsum(1) / steps))


class TinyShared:
    """``SharedModules`` of a toy model: a head, and blocks of the toy's own kind."""

    def __init__(self):
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def output_weight(self):
        return self.head.weight

    def logits(self, hidden):
        return self.head(hidden)

    def new_block(self, index):
        return CausalBlock(index)

    def init_block(self, block):
        nn.init.normal_(block.mix.weight, std=0.3)

    def run_block(self, block, hidden, context):
        assert context == {}
        return block(hidden)


def make_mtp(**options):
    torch.manual_seed(0)
    shared = TinyShared()
    info = ModelInfo(dim=DIM, n_layers=LAYERS, vocab_size=VOCAB, seq_len=SEQ, shared=shared)
    objective = get_objective("mtp")(MTPOptions(**options), info)
    objective.init_weights()
    return objective, shared


def make_features():
    torch.manual_seed(1)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels[0, 4] = -100
    labels[1, 8] = -100
    trunk = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    embeddings = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    return Features(labels=labels, layers={LAYERS: trunk, 0: embeddings})


def reference(objective, shared, features):
    """(1/D) sum_k CE_k with explicit loops; also each CE_k. Under block-causal masks
    (``features.documents``) depth k scores position i only if i + k is in i's document."""
    variant, depth = objective.options.variant, objective.options.depth
    trunk, embeddings, labels = features.layers[LAYERS], features.layers[0], features.labels
    previous, per_depth = trunk, []
    for k in range(1, depth + 1):
        module = objective.depths[k - 1]
        if variant == "deepseek":
            shifted = torch.zeros_like(embeddings)
            shifted[:, : SEQ - k] = embeddings[:, k:]  # Emb(t_{i+k})
            joined = torch.cat([module.hidden_norm(previous), module.embedding_norm(shifted)], -1)
            hidden = module.block(module.projection(joined))
            previous = hidden
        else:
            hidden = module.block(trunk)
        logits = module.norm(hidden) @ shared.head.weight.t()
        ce = torch.zeros(())
        for b in range(BATCH):
            for i in range(SEQ - k):
                target, input_token = labels[b, i + k], labels[b, i + k - 1]
                if target == -100 or input_token == -100:
                    continue
                documents = features.documents
                if documents is not None and documents[b, i] != documents[b, i + k]:
                    continue
                ce = ce + F.cross_entropy(logits[b, i], target, reduction="sum")
        per_depth.append(ce)
    return sum(per_depth) / depth, per_depth


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)


@pytest.mark.parametrize("variant", ["deepseek", "parallel"])
@pytest.mark.parametrize("depth", [1, 3])
def test_matches_explicit_loops(variant, depth):
    objective, shared = make_mtp(variant=variant, depth=depth)
    features = make_features()
    out = objective(features)
    expected, per_depth = reference(objective, shared, features)
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-5)
    for k, ce in enumerate(per_depth, start=1):
        torch.testing.assert_close(
            out.metrics[f"depth_{k}"].total, ce.detach(), rtol=1e-5, atol=1e-5
        )
    tensors = [features.layers[LAYERS], shared.head.weight, *objective.parameters()]
    if variant == "deepseek":
        tensors.append(features.layers[0])
    for got, want in zip(grads(out.loss_sum, tensors), grads(expected, tensors), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["deepseek", "parallel"])
def test_packed_documents_score_no_depth_across_a_boundary(variant):
    """Documents ending mid-sequence (after positions 2 and 5 in row 0, 6 in row 1): no
    shifted input or label is taken from another document."""
    objective, shared = make_mtp(variant=variant, depth=2)
    features = make_features()
    features.documents = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2], [0] * 7 + [1] * 2])
    out = objective(features)
    expected, per_depth = reference(objective, shared, features)
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-5)
    without_documents = reference(objective, shared, make_features())[0]
    assert not torch.allclose(expected, without_documents)  # the boundaries matter here
    for k, ce in enumerate(per_depth, start=1):
        torch.testing.assert_close(
            out.metrics[f"depth_{k}"].total, ce.detach(), rtol=1e-5, atol=1e-5
        )
    tensors = [features.layers[LAYERS], shared.head.weight, *objective.parameters()]
    for got, want in zip(grads(out.loss_sum, tensors), grads(expected, tensors), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_depth_counts_and_ignored_positions():
    objective, _ = make_mtp(depth=2)
    features = make_features()
    out = objective(features)
    # depth k scores positions i < SEQ - k whose target and input token are labelled.
    labels = features.labels
    for k in (1, 2):
        count = sum(
            1
            for b in range(BATCH)
            for i in range(SEQ - k)
            if labels[b, i + k] != -100 and labels[b, i + k - 1] != -100
        )
        assert out.metrics[f"depth_{k}"].count == count


@pytest.mark.parametrize("variant", ["deepseek", "parallel"])
def test_chunked_and_recomputed_paths_match(variant):
    objective, shared = make_mtp(variant=variant, depth=2)
    features = make_features()
    tensors = [features.layers[LAYERS], shared.head.weight, *objective.parameters()]
    base = objective(features).loss_sum
    base_grads = grads(base, tensors)
    for options in ({"chunk_size": 5}, {"recompute_heads": True}):
        for key, value in options.items():
            setattr(objective.options, key, value)
        loss = objective(features).loss_sum
        torch.testing.assert_close(loss, base, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads(loss, tensors), base_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        objective.options.chunk_size, objective.options.recompute_heads = 0, False


def test_blocks_come_from_the_model_and_are_placed_after_the_trunk():
    objective, _ = make_mtp(depth=3)
    assert [m.block.index for m in objective.depths] == [LAYERS, LAYERS + 1, LAYERS + 2]
    assert all(isinstance(m.block, CausalBlock) for m in objective.depths)
    # The head is shared: the objective owns none of its parameters.
    names = [n for n, _ in objective.named_parameters()]
    assert not any("head" in n for n in names)
    assert objective.requirements().layers == frozenset({0, LAYERS})
    parallel, _ = make_mtp(variant="parallel")
    assert parallel.requirements().layers == frozenset({LAYERS})
