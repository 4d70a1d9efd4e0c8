"""The vocabulary dimension of logits, whole on one rank or split over tensor-parallel ranks.

Under tensor parallelism with loss parallel, the LM head is split over the vocabulary:
``Features.logits`` is then a DTensor sharded on its last dimension, each rank holding
``vocab / tp`` columns. An objective that reads logits stays right on one rank and on a
split vocabulary by going through these functions, which take the logits either way.

Two kinds of results: ``logsumexp``, ``vocabulary_sum`` and ``gather`` are the same on
every rank and enter a loss as they are; ``log_softmax`` and ``local_columns`` are this
rank's columns, which reach a loss only through ``vocabulary_sum`` or ``gather``.

They work on the local columns with explicit collectives rather than DTensor dispatch.
Inside ``loss_parallel()`` (which torchtitan enables for the whole training step)
DTensor's ``log_softmax`` is rewritten for the cross-entropy that usually consumes it,
and its gradient is the identity when anything else does (pytorch/pytorch#190746). Every result
here is a plain tensor, the same on every rank of the group, with gradients that reach
each rank's columns.
"""

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from titan_objectives.collectives import all_reduce, sum_over_ranks


def shard_range(size: int, mesh: DeviceMesh) -> tuple[int, int]:
    """The first and past-the-last index this rank holds of a dimension of ``size`` split
    over ``mesh`` by DTensor's ``Shard``: like torch.chunk, ceil(size / ranks) per rank,
    the last ranks fewer."""
    per_rank = -(-size // mesh.size())
    start = min(mesh.get_local_rank() * per_rank, size)
    return start, min(start + per_rank, size)


def local_columns(logits: torch.Tensor) -> tuple[torch.Tensor, slice, DeviceMesh | None]:
    """This rank's logits, the vocabulary ids they hold, and the mesh the vocabulary is
    split over (``None`` when it is whole)."""
    vocab = logits.shape[-1]
    if not isinstance(logits, DTensor):
        return logits, slice(0, vocab), None
    placements = logits.placements
    if (
        logits.device_mesh.ndim != 1
        or len(placements) != 1
        or not isinstance(placements[0], Shard)
        or placements[0].dim % logits.ndim != logits.ndim - 1
    ):
        raise ValueError(
            f"logits are a DTensor with placements {placements} on a {logits.device_mesh.ndim}-D "
            "mesh; expected whole logits or logits sharded on the vocabulary (Shard(-1)) over "
            "one tensor-parallel dimension"
        )
    mesh = logits.device_mesh
    return logits.to_local(), slice(*shard_range(vocab, mesh)), mesh


def logsumexp_over_ranks(local: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """log-sum-exp over columns split across the ranks of ``mesh`` (a max and a sum
    all-reduce), without gradient: the building block of the functions below and of the
    chunked cross-entropy."""
    global_max = all_reduce(local.amax(dim=-1), "max", mesh)
    # A row that is -inf everywhere would give nan - nan; shift it by 0 instead.
    shift = torch.where(torch.isfinite(global_max), global_max, 0.0)
    partial = (local - shift[..., None]).exp().sum(dim=-1)
    return all_reduce(partial, "sum", mesh).log() + shift


class _ShardedLogSumExp(torch.autograd.Function):
    """The log-sum-exp is the same on every rank, and so is its gradient: each rank's
    columns get the softmax of those columns times it."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:  # type: ignore[override]
        lse = logsumexp_over_ranks(local, mesh)
        ctx.save_for_backward(local, lse)
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        local, lse = ctx.saved_tensors
        # A row that is -inf everywhere has no softmax: its columns get no gradient.
        finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
        softmax = torch.where(
            torch.isfinite(lse)[..., None], (local - finite_lse[..., None]).exp(), 0
        )
        return grad[..., None] * softmax, None


class _ShardedLogSoftmax(torch.autograd.Function):
    """Log-probabilities of this rank's columns. Their gradient only covers this rank's
    columns, so backward adds up ``sum_v grad_v`` over the ranks (one all-reduce of a
    ``[...]`` tensor) for the softmax term: ``grad - softmax * sum_v grad_v``."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:  # type: ignore[override]
        log_p = local - logsumexp_over_ranks(local, mesh)[..., None]
        ctx.save_for_backward(log_p)
        ctx.mesh = mesh
        return log_p

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (log_p,) = ctx.saved_tensors
        total = all_reduce(grad.sum(dim=-1), "sum", ctx.mesh)
        return grad - log_p.exp() * total[..., None], None


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``log(sum_v exp(logits[..., v]))`` over the whole vocabulary, in fp32: ``[...]``,
    the same on every rank."""
    local, _, mesh = local_columns(logits)
    if mesh is None:
        return torch.logsumexp(local.float(), dim=-1)
    return _ShardedLogSumExp.apply(local.float(), mesh)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the whole vocabulary, in fp32, of this rank's columns
    (``local_columns``): combine them with ``vocabulary_sum`` or ``gather``."""
    local, _, mesh = local_columns(logits)
    if mesh is None:
        return torch.log_softmax(local.float(), dim=-1)
    return _ShardedLogSoftmax.apply(local.float(), mesh)


def vocabulary_sum(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The sum over the whole vocabulary of ``values``, laid out like this rank's columns
    of ``logits`` (e.g. ``p * log_softmax(logits)``): ``[...]``."""
    _, _, mesh = local_columns(logits)
    partial = values.sum(dim=-1)
    return partial if mesh is None else sum_over_ranks(partial, mesh)


def gather(logits: torch.Tensor, index: torch.Tensor, values: torch.Tensor | None = None):
    """``values[..., index]`` for vocabulary ids ``index`` (``[..., k]``, whole-vocabulary
    ids, all valid), wherever the columns live. ``values`` defaults to ``logits`` and may
    be anything laid out like this rank's columns (e.g. ``log_softmax(logits)``)."""
    local, columns, mesh = local_columns(logits)
    values = local if values is None else values
    if mesh is None:
        return values.gather(-1, index)
    here = (index >= columns.start) & (index < columns.stop)
    local_index = torch.where(here, index - columns.start, 0)
    partial = torch.where(here, values.gather(-1, local_index), 0)
    return sum_over_ranks(partial, mesh)
