"""Vocabulary helpers: on whole logits they are torch's formulas; on logits split over the
vocabulary between 2 gloo processes, inside ``loss_parallel()`` as torchtitan trains,
they give the single-process values and gradients."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from titan_objectives import vocabulary

BATCH, SEQ, VOCAB, WORLD = 2, 5, 13, 2  # 13 columns: 7 on rank 0, 6 on rank 1


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(BATCH, SEQ, VOCAB) * 3
    logits[0, 1, 2] = float("-inf")  # a masked column
    weights = torch.rand(BATCH, SEQ, VOCAB)
    index = torch.randint(0, VOCAB, (BATCH, SEQ, 3))
    return logits, weights, index


def reference_loss(logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor):
    """A loss touching every helper, from torch's own functions."""
    lse = torch.logsumexp(logits, dim=-1)
    log_p = F.log_softmax(logits, dim=-1).masked_fill(torch.isinf(logits), 0.0)
    return (
        lse.square()
        - (weights * log_p).sum(-1)
        + 0.5 * logits.gather(-1, index).sum(-1)
        - log_p.gather(-1, index).sum(-1)
    ).sum()


def helper_loss(logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor):
    """The same loss through ``titan_objectives.vocabulary``; ``weights`` are this rank's
    columns."""
    lse = vocabulary.logsumexp(logits)
    log_p = vocabulary.log_softmax(logits)
    log_p = log_p.masked_fill(torch.isinf(log_p), 0.0)
    return (
        lse.square()
        - vocabulary.vocabulary_sum(logits, weights * log_p)
        + 0.5 * vocabulary.gather(logits, index).sum(-1)
        - vocabulary.gather(logits, index, values=log_p).sum(-1)
    ).sum()


def test_whole_logits_are_torchs_formulas():
    logits, weights, index = inputs()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    expected, got = reference_loss(a, weights, index), helper_loss(b, weights, index)
    torch.testing.assert_close(got, expected)
    expected.backward()
    got.backward()
    torch.testing.assert_close(b.grad, a.grad)
    local, columns, mesh = vocabulary.local_columns(logits)
    assert local is logits and columns == slice(0, VOCAB) and mesh is None


def _sharded_worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        logits, weights, index = inputs()
        sharded = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_()
        _, columns, _ = vocabulary.local_columns(sharded)
        with loss_parallel():  # torchtitan's training context under loss parallel
            loss = helper_loss(sharded, weights[..., columns], index)
            loss.backward()
        # A row masked everywhere: log-sum-exp -inf, and no NaN gradient.
        masked = torch.full((1, VOCAB), float("-inf"))
        masked = distribute_tensor(masked, mesh, [Shard(1)]).requires_grad_()
        masked_lse = vocabulary.logsumexp(masked)
        masked_lse.sum().backward()
        masked_ok = bool(masked_lse.isneginf().all() and (masked.grad.full_tensor() == 0).all())
        replicated = distribute_tensor(logits, mesh, [Replicate()])
        try:
            vocabulary.logsumexp(replicated)
            refused = ""
        except ValueError as error:
            refused = str(error)
        results[rank] = (loss.detach(), sharded.grad.full_tensor(), columns, refused, masked_ok)
    finally:
        dist.destroy_process_group()


def test_split_vocabulary_matches_one_process():
    logits, weights, index = inputs()
    whole = logits.clone().requires_grad_()
    expected = reference_loss(whole, weights, index)
    expected.backward()
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sharded_worker, args=(os.path.join(folder, "store"), results), nprocs=WORLD)
        results = dict(results)
    assert [results[r][2] for r in range(WORLD)] == [slice(0, 7), slice(7, 13)]
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank][0], expected.detach())  # same on every rank
        torch.testing.assert_close(results[rank][1], whole.grad)
        assert "expected whole logits or logits sharded on the vocabulary" in results[rank][3]
        assert results[rank][4]  # all -inf row: -inf, zero gradient
