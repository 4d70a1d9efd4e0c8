"""How a batch's positions are split over ranks, and the two operations that cross shards.

Under sequence parallelism (torchtitan's tensor parallel) each rank of the group holds
positions ``[rank * n, (rank + 1) * n)`` of every hidden state, while labels stay whole.
Most of an objective is per position and runs unchanged on a shard; only a shift along
the sequence and a sum over positions need the other shards. Objectives do both through
``Features.sequence``, so one code path is right on one rank and on a sharded group.
"""

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_objectives.collectives import all_gather, sum_over_ranks


def shift_left(
    x: torch.Tensor, k: int, fill: float | int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``out[:, i] = x[:, i + k]`` along dim 1; the last k positions are ``fill``. One
    new tensor, in ``dtype`` (default: ``x``'s), so a cast costs no second copy."""
    out = x.new_full(x.shape, fill, dtype=dtype)
    out[:, : x.shape[1] - k] = x[:, k:]
    return out


class SequenceShards:
    """The positions this rank holds: all of them (``mesh=None``), or one of
    ``mesh.size()`` equal, contiguous shards of dim 1."""

    def __init__(self, mesh: DeviceMesh | None = None):
        self.mesh = mesh
        self.size = mesh.size() if mesh is not None else 1
        self.rank = mesh.get_local_rank() if mesh is not None else 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's positions of a whole-sequence tensor (e.g. labels or a mask)."""
        if not self.sharded:
            return full
        n = full.shape[1] // self.size
        return full[:, self.rank * n : (self.rank + 1) * n]

    def shift_left(
        self, x: torch.Tensor, k: int, fill: float | int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``shift_left`` of the whole sequence, on this rank's shard: the last k positions
        of a shard come from the next rank's first k (gradients flow back to it), those
        of the last shard are ``fill``. Communicates only the k boundary positions."""
        if not self.sharded:
            return shift_left(x, k, fill, dtype)
        if k > x.shape[1]:
            raise ValueError(
                f"a shift by {k} positions crosses more than one sequence shard of "
                f"{x.shape[1]} positions"
            )
        # Gather every rank's first k positions along dim 0 (the collectives' native
        # layout), then keep the next rank's.
        heads = all_gather(x[:, :k].transpose(0, 1).contiguous(), self.mesh)
        following_rank = (self.rank + 1) % self.size
        following = heads[following_rank * k : (following_rank + 1) * k].transpose(0, 1)
        if following_rank == 0:
            # The last shard has nothing after it. Fill, but from the gathered tensor, so
            # that every rank takes part in the gather's backward (a reduce-scatter).
            everywhere = torch.ones((), dtype=torch.bool, device=x.device)
            following = following.masked_fill(everywhere, fill)
        out = shift_left(x, k, fill, dtype)
        out[:, x.shape[1] - k :] = following
        return out

    def all_positions(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence of a sharded tensor on every rank, for a computation that
        each rank does in part (a head split over the vocabulary): in backward the ranks'
        gradients add up, each rank getting its own positions' sum (a reduce-scatter)."""
        if not self.sharded:
            return x
        return all_gather(x.transpose(0, 1).contiguous(), self.mesh).transpose(0, 1)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence of a sharded tensor, on every rank, without gradient (for
        measurements, not losses)."""
        return self.all_positions(x.detach())

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over all shards of a per-shard sum, the same on every rank."""
        if not self.sharded:
            return partial
        return sum_over_ranks(partial, self.mesh)


UNSHARDED = SequenceShards()
