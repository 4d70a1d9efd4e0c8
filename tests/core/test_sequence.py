"""SequenceShards: a shift and a sum over a sequence split between 2 gloo processes give
the single-process values and gradients."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from titan_objectives.sequence import UNSHARDED, SequenceShards, shift_left

BATCH, SEQ, DIM, WORLD = 2, 8, 3, 2


def reference(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, shifted tensor and gradient, computed on the whole sequence in one process."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    weights = torch.randn(BATCH, SEQ, DIM)
    shifted = shift_left(x, k, 0.5)
    loss = (shifted * weights).sum()
    loss.backward()
    return loss.detach(), shifted.detach(), x.grad


def _sharded_worker(rank: int, init_file: str, k: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        sequence = SequenceShards(init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)))
        torch.manual_seed(0)
        x_full = torch.randn(BATCH, SEQ, DIM)
        weights = sequence.local(torch.randn(BATCH, SEQ, DIM))
        x = sequence.local(x_full).clone().requires_grad_()
        shifted = sequence.shift_left(x, k, 0.5)
        loss = sequence.sum((shifted * weights).sum())
        loss.backward()
        results[rank] = (loss.detach(), shifted.detach(), x.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("k", [1, 4])
def test_shift_and_sum_across_two_shards_match_one_process(k):
    expected_loss, expected_shifted, expected_grad = reference(k)
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        init_file = os.path.join(folder, "store")
        mp.spawn(_sharded_worker, args=(init_file, k, results), nprocs=WORLD)
        results = dict(results)
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank][0], expected_loss)  # the same on every rank
    shifted = torch.cat([results[rank][1] for rank in range(WORLD)], dim=1)
    grad = torch.cat([results[rank][2] for rank in range(WORLD)], dim=1)
    torch.testing.assert_close(shifted, expected_shifted)
    torch.testing.assert_close(grad, expected_grad)


def test_unsharded_is_the_plain_operations():
    x = torch.arange(12.0).reshape(1, 6, 2)
    torch.testing.assert_close(UNSHARDED.shift_left(x, 2, -1.0), shift_left(x, 2, -1.0))
    assert UNSHARDED.local(x) is x
    assert UNSHARDED.sum(x) is x
    expected = torch.tensor(
        [[[4.0, 5.0], [6.0, 7.0], [8.0, 9.0], [10.0, 11.0], [-1, -1], [-1, -1]]]
    )
    torch.testing.assert_close(shift_left(x, 2, -1.0), expected)


def head_tail(seq: int, ranks: int, rank: int) -> torch.Tensor:
    """Load-balanced context parallelism: rank r holds chunks r and 2W-1-r of 2W."""
    chunk = seq // (2 * ranks)
    first, second = rank * chunk, (2 * ranks - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def in_order(seq: int, ranks: int, rank: int) -> torch.Tensor:
    """Context parallelism without load balancing: one contiguous chunk per rank."""
    chunk = seq // ranks
    return torch.arange(rank * chunk, (rank + 1) * chunk)


def _context_worker(rank, init_file, k, layout, cp, tp, results) -> None:
    from titan_objectives.sequence import ContextLayout

    world = cp * tp
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (cp, tp), mesh_dim_names=("cp", "tp"))
        cp_rank = mesh["cp"].get_local_rank()
        context = ContextLayout(mesh["cp"], lambda seq: layout(seq, cp, cp_rank))
        sequence = SequenceShards(mesh["tp"] if tp > 1 else None, context)
        torch.manual_seed(0)
        x_full = torch.randn(BATCH, 2 * SEQ, DIM)
        weights = sequence.local(torch.randn(BATCH, 2 * SEQ, DIM))
        x = sequence.local(x_full).clone().requires_grad_()
        shifted = sequence.shift_left(x, k, 0.5)
        loss = sequence.sum((shifted * weights).sum())
        loss.backward()
        positions = sequence.local(torch.arange(2 * SEQ)[None])[0]
        group = sequence.in_group(torch.arange(2 * SEQ)[None])[0]
        labels = torch.arange(2 * BATCH * SEQ).reshape(BATCH, 2 * SEQ)
        assert torch.equal(sequence.whole(sequence.in_group(labels)), labels)
        results[rank] = (loss.detach(), shifted.detach(), x.grad, positions, group)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "k, layout, cp, tp",
    [(1, head_tail, 2, 1), (4, head_tail, 2, 1), (2, in_order, 2, 1), (2, head_tail, 2, 2)],
)
def test_shift_across_context_parallel_chunks_matches_one_process(k, layout, cp, tp):
    """Each rank's positions come from the layout (head-tail: 0-3 and 12-15 on rank 0 of
    16 positions, 4-11 on rank 1, so a run's continuation may be on the same rank); the
    shift, its gradient and the per-group sums equal the whole sequence's."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, 2 * SEQ, DIM, requires_grad=True)
    weights = torch.randn(BATCH, 2 * SEQ, DIM)
    shifted = shift_left(x, k, 0.5)
    (shifted * weights).sum().backward()
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        init_file = os.path.join(folder, "store")
        mp.spawn(_context_worker, args=(init_file, k, layout, cp, tp, results), nprocs=cp * tp)
        results = dict(results)
    positions = torch.cat([results[rank][3] for rank in range(cp * tp)])
    assert sorted(positions.tolist()) == list(range(2 * SEQ))
    for rank in range(cp * tp):
        held = results[rank][3]
        torch.testing.assert_close(results[rank][1], shifted.detach()[:, held])
        torch.testing.assert_close(results[rank][2], x.grad[:, held])
        group = results[rank][4]
        assert set(held.tolist()) <= set(group.tolist()) and len(group) == 2 * SEQ // cp
    total = sum(results[rank][0] for rank in range(0, cp * tp, tp))  # one per CP group
    torch.testing.assert_close(total, (shifted * weights).sum().detach())
