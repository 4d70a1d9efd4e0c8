"""Auxiliary-loss-free load balancing for MoE blocks that objectives own.

torchtitan updates each MoE router's expert bias from the tokens it routed, in an
optimizer pre-step hook that only visits ``model.layers``. An MTP module built from a
DeepSeek-V3 / Qwen3 / Llama4 block has its own router, so the same update is applied to
those, for the models whose torchtitan setup balances: bias += coeff * sign(mean load -
load), centred, from the load summed over the data-parallel ranks; then the counts
restart. The two hosts name the buffers differently (``BufferNames``).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class BufferNames:
    """Where a router keeps its bias and its token counts."""

    bias: str
    counts: str


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def objective_routers(objectives: nn.Module, names: BufferNames) -> list[nn.Module]:
    return [
        module
        for module in objectives.modules()
        if getattr(module, names.bias, None) is not None
        and getattr(module, "load_balance_coeff", None) is not None
    ]


@torch.no_grad()
def update_expert_bias(
    routers: list[nn.Module], meshes: list[DeviceMesh], names: BufferNames
) -> None:
    """``meshes``: the groups over which torchtitan sums the token counts (the
    data-parallel ranks, and on 0.3 the TP group too under expert parallelism)."""
    loads = torch.vstack([_local(getattr(r, names.counts)) for r in routers]).float()
    for mesh in meshes:
        dist.all_reduce(loads, group=mesh.get_group())
    for router, load in zip(routers, loads, strict=True):
        delta = router.load_balance_coeff * torch.sign(load.mean() - load)
        _local(getattr(router, names.bias)).add_(delta - delta.mean())
        _local(getattr(router, names.counts)).zero_()


def install(
    optimizers, objectives: nn.Module, meshes: list[DeviceMesh], names: BufferNames
) -> bool:
    """Register the update on ``optimizers`` if objectives own MoE routers."""
    routers = objective_routers(objectives, names)
    if routers:
        optimizers.register_step_pre_hook(lambda *_: update_expert_bias(routers, meshes, names))
    return bool(routers)
