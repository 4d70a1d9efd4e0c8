"""The collectives objectives' tensors cross ranks with: a gather and a sum with their
gradients, and a plain all-reduce for what needs none."""

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

# all_gather_single_autograd is torch >= 2.13's name; older releases only have the other.
_all_gather = getattr(funcol, "all_gather_single_autograd", None)
if _all_gather is None:
    _all_gather = funcol.all_gather_tensor_autograd


def all_gather(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0; gradients flow back to each rank's."""
    return _all_gather(x, 0, mesh)


def all_reduce(x: torch.Tensor, op: str, mesh: DeviceMesh) -> torch.Tensor:
    """``x`` reduced (``"sum"``, ``"max"``) over ``mesh``, waited for; no gradient (inside
    our own autograd functions, and for measurements)."""
    return funcol.wait_tensor(funcol.all_reduce(x, op, mesh))


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: each rank's partial sum enters one
    loss that every rank computes alike, whose gradient every rank already holds whole."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:  # type: ignore[override]
        return all_reduce(partial, "sum", mesh)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def sum_over_ranks(partial: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The sum of every rank's ``partial``, the same on every rank, for a loss that each
    rank of ``mesh`` computes alike (tensor parallelism): the gradient is the identity."""
    return _SumOverRanks.apply(partial, mesh)
