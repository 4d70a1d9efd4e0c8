"""Every cross-entropy backend against the plain path (logits, then F.cross_entropy): on
one process, and with the head split over the vocabulary between 2 gloo processes."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from titan_objectives.losses import linear_cross_entropy as lce
from titan_objectives.losses import linear_cross_entropy_sum
from titan_objectives.sequence import SequenceShards

TOKENS, DIM, VOCAB = 37, 16, 50
# PyTorch's kernel where this torch has it (2.13+; the GPU image's 2.11 does not).
BACKENDS = ["torch", "chunked"] if lce.torch_has_linear_cross_entropy() else ["chunked"]


def plain(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def inputs(dtype=torch.float32, seed=0, tokens=TOKENS):
    torch.manual_seed(seed)
    hidden = torch.randn(tokens, DIM, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(VOCAB, DIM)).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (tokens,))
    labels[[0, 5, tokens - 1]] = -100
    return hidden, weight, labels


def value_and_grads(fn, hidden, weight, labels, scale=0.37):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64, 5])
def test_matches_plain_cross_entropy_fp32(backend, chunk_size):
    hidden, weight, labels = inputs()
    expected = value_and_grads(plain, hidden, weight, labels)
    got = value_and_grads(
        lambda h, w, y: linear_cross_entropy_sum(h, w, y, chunk_size, backend),
        hidden,
        weight,
        labels,
    )
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_plain_cross_entropy_bf16(backend):
    hidden, weight, labels = inputs(torch.bfloat16)
    expected = value_and_grads(plain, hidden, weight, labels)
    got = value_and_grads(
        lambda h, w, y: linear_cross_entropy_sum(h, w, y, 8, backend), hidden, weight, labels
    )
    assert got[0].dtype == torch.float32
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2], expected[2], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shapes_and_all_ignored(backend):
    hidden, weight, labels = inputs()
    loss = linear_cross_entropy_sum(
        hidden.view(1, TOKENS, DIM), weight, labels.view(1, TOKENS), 4, backend
    )
    torch.testing.assert_close(loss, plain(hidden, weight, labels), rtol=1e-5, atol=0)
    none = torch.full((TOKENS,), -100)
    assert linear_cross_entropy_sum(hidden, weight, none, 4, backend).item() == 0.0


def test_no_grad_path_returns_the_same_value():
    hidden, weight, labels = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, labels, 8, "chunked")
    torch.testing.assert_close(loss, plain(hidden, weight, labels).detach(), rtol=1e-5, atol=0)


@pytest.mark.skipif(
    not lce.torch_has_linear_cross_entropy(), reason="this torch has no F.linear_cross_entropy"
)
def test_auto_picks_pytorchs_kernel_where_torch_has_it(monkeypatch):
    calls = []
    real = F.linear_cross_entropy
    monkeypatch.setattr(F, "linear_cross_entropy", lambda *a, **k: calls.append(k) or real(*a, **k))
    hidden, weight, labels = inputs()
    linear_cross_entropy_sum(hidden, weight, labels, 8)
    assert len(calls) == 1 and calls[0]["options"].batch_chunk_size == 8


def test_auto_falls_back_to_ours_without_pytorchs_kernel(monkeypatch):
    """As on the GPU image's torch 2.11: no F.linear_cross_entropy, auto runs ours."""
    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    assert not lce.torch_has_linear_cross_entropy()
    hidden, weight, labels = inputs()
    loss = linear_cross_entropy_sum(hidden, weight, labels, 8)
    torch.testing.assert_close(loss, plain(hidden, weight, labels).detach(), rtol=1e-5, atol=0)


def test_chunk_size_must_be_positive():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="chunk_size must be > 0, got 0"):
        linear_cross_entropy_sum(hidden, weight, labels, 0)


WORLD, BATCH, SEQ = 2, 2, 10


def _split_head_worker(rank: int, init_file: str, chunk_size: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        sequence = SequenceShards(mesh)
        hidden, weight, labels = inputs(tokens=BATCH * SEQ)
        hidden = sequence.local(hidden.detach().view(BATCH, SEQ, DIM)).clone().requires_grad_()
        # 50 rows: 25 per rank, as torchtitan's ColwiseParallel head splits them.
        split = distribute_tensor(weight.detach(), mesh, [Shard(0)]).requires_grad_()
        loss = linear_cross_entropy_sum(
            hidden, split, labels.view(BATCH, SEQ), chunk_size, "auto", sequence
        )
        (loss * 0.37).backward()
        try:  # a head split otherwise cannot be chunked by rows
            replicated = distribute_tensor(weight.detach(), mesh, [Replicate()])
            linear_cross_entropy_sum(
                hidden, replicated, labels.view(BATCH, SEQ), 4, "auto", sequence
            )
            refused = ""
        except ValueError as error:
            refused = str(error)
        results[rank] = (loss.detach(), hidden.grad, split.grad.full_tensor(), refused)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("chunk_size", [6, 20])
def test_head_split_over_the_vocabulary_matches_one_process(chunk_size):
    """Tensor parallel: sequence-sharded hidden states, a head split over the vocabulary
    (chunks that do and do not divide the 20 tokens)."""
    hidden, weight, labels = inputs(tokens=BATCH * SEQ)
    expected = value_and_grads(plain, hidden, weight, labels)
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        init_file = os.path.join(folder, "store")
        mp.spawn(_split_head_worker, args=(init_file, chunk_size, results), nprocs=WORLD)
        results = dict(results)
    hidden_grad = torch.cat([results[r][1] for r in range(WORLD)], dim=1).view(-1, DIM)
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank][0], expected[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(results[rank][2], expected[2], rtol=1e-4, atol=1e-6)
        assert "expected rows split over the vocabulary (Shard(0))" in results[rank][3]
    torch.testing.assert_close(hidden_grad, expected[1], rtol=1e-4, atol=1e-6)
