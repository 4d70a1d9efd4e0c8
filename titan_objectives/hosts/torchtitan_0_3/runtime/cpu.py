"""Lets torchtitan 0.3.0 train on a machine without an accelerator, with gloo.

Besides the patches both hosts need (``hosts.common.cpu_patches``), torchtitan 0.3.0
trains language models with block-causal FlexAttention only, which has no backward on
CPU: the compiled kernel is replaced by scaled-dot-product attention under the dense
mask the BlockMask stands for (the same attention, slower). And it shortens process-group
timeouts after the first step with ``torch.distributed.set_timeout``, which torch 2.14
lacks: without it, that call does nothing. ``activate()`` applies them before torchtitan
is imported, and does nothing when CUDA is available.
"""

import types
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F

from titan_objectives.hosts.common import cpu_patches


def _keep_timeout(timeout: timedelta, group: Any = None) -> None:
    """The process groups keep the timeout they were created with."""


def dense_flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    score_mod: Any,
    block_mask: Any,
    scale: float | None,
    enable_gqa: bool,
    return_aux: Any,
    kernel_options: dict,
) -> tuple[torch.Tensor, None]:
    """``FlexAttention.compiled_flex_attn`` on CPU: the BlockMask's ``mask_mod`` made
    dense (``[batch, 1, q, kv]``) for ``scaled_dot_product_attention``."""
    from torch.nn.attention.flex_attention import create_mask

    if score_mod is not None or return_aux.lse:
        raise NotImplementedError(
            "the CPU stand-in for FlexAttention supports masks only (no score_mod, no lse)"
        )
    mask = create_mask(block_mask.mask_mod, q.shape[0], None, q.shape[2], k.shape[2], q.device)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa
    )
    return out, None


def _attention_with_dense_masks() -> None:
    from torchtitan.models.common.attention import FlexAttention

    FlexAttention.compiled_flex_attn = staticmethod(dense_flex_attention)


def _import_tools_utils() -> types.ModuleType:
    import torchtitan.tools.utils

    return torchtitan.tools.utils


def _set_timeout_if_missing() -> None:
    if not hasattr(torch.distributed, "set_timeout"):
        torch.distributed.set_timeout = _keep_timeout


RUNTIME = cpu_patches.CPURuntime(
    __name__, _import_tools_utils, after=(_attention_with_dense_masks, _set_timeout_if_missing)
)
activate = RUNTIME.activate
exit_after_training = RUNTIME.exit_after_training
