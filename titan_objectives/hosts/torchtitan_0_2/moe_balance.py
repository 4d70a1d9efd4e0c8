"""Auxiliary-loss-free load balancing for MoE blocks that objectives own.

torchtitan updates each MoE router's ``expert_bias`` from the tokens it routed, in an
optimizer pre-step hook that only visits ``model.layers``. An MTP module built from a
DeepSeek-V3 / Qwen3 / Llama4 block has its own router, so the same update is applied to
those, for the models whose TrainSpec balances (deepseek_v3, llama4; torchtitan 0.2.2
leaves qwen3's biases at zero): bias += coeff * sign(mean load - load), centred, from the
load summed over the data-parallel ranks; then the counts restart.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def objective_routers(objectives: nn.Module) -> list[nn.Module]:
    return [
        module
        for module in objectives.modules()
        if getattr(module, "expert_bias", None) is not None
        and getattr(module, "load_balance_coeff", None) is not None
    ]


@torch.no_grad()
def update_expert_bias(routers: list[nn.Module], mesh: DeviceMesh | None) -> None:
    loads = torch.vstack([router.tokens_per_expert for router in routers]).float()
    if mesh is not None:
        dist.all_reduce(loads, group=mesh.get_group())
    for router, load in zip(routers, loads, strict=True):
        delta = router.load_balance_coeff * torch.sign(load.mean() - load)
        router.expert_bias.add_(delta - delta.mean())
        router.tokens_per_expert.zero_()


def install(optimizers, objectives: nn.Module, mesh: DeviceMesh | None) -> bool:
    """Register the update on ``optimizers`` if objectives own MoE routers."""
    routers = objective_routers(objectives)
    if routers:
        optimizers.register_step_pre_hook(lambda *_: update_expert_bias(routers, mesh))
    return bool(routers)
