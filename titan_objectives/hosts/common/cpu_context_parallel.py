"""Context parallelism on CPU: torch's ring attention for the CPU SDPA kernel.

torch's context parallel dispatches SDPA on sequence-sharded DTensors to ring attention,
but only for the CUDA kernels (flash, efficient, cuDNN) listed in its ``custom_ops``; on
CPU, SDPA runs ``aten._scaled_dot_product_flash_attention_for_cpu``, which has no entry
and no sharding rule. This gives that kernel and its backward the same treatment: the
local shards go through torch's own ``_templated_ring_attention`` (and its backward), with
its load-balanced causal schedule, and the results come back sharded on the sequence.
The CPU kernel takes values only as wide as the keys, so narrower values (DeepSeek's
MLA) are padded with zeros for it and its output cut back; without that, SDPA falls back
to its math path, which DTensor cannot run. With CUDA present the CPU runtime is not
applied and torch's own kernels run.
"""

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

aten = torch.ops.aten
SEQUENCE_DIM = 2  # SDPA's (batch, heads, sequence, head_dim)
# Where torch keeps its context-parallel attention (torch 2.11 to 2.14).
ATTENTION_MODULES = (
    "torch.distributed.tensor.experimental._context_parallel._attention",
    "torch.distributed.tensor.experimental._attention",
)


def _attention_module() -> Any:
    for name in ATTENTION_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "custom_ops") and hasattr(module, "_templated_ring_attention"):
            return module
    raise RuntimeError(
        f"no context-parallel attention in this torch (looked in {ATTENTION_MODULES})"
    )


def _local(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, list, dict]:
    """The device mesh of the DTensor arguments, and every argument as a local tensor."""
    mesh = next(a.device_mesh for a in (*args, *kwargs.values()) if isinstance(a, DTensor))
    unwrap = lambda a: a.to_local() if isinstance(a, DTensor) else a  # noqa: E731
    return mesh, [unwrap(a) for a in args], {k: unwrap(v) for k, v in kwargs.items()}


def _sharded(mesh: Any, tensors: tuple[torch.Tensor, ...]) -> tuple[DTensor, ...]:
    placements = [Shard(SEQUENCE_DIM)]
    return tuple(DTensor.from_local(t, mesh, placements, run_check=False) for t in tensors)


def _forward(op_call: Any, args: tuple, kwargs: dict) -> tuple[DTensor, ...]:
    """``(query, key, value, dropout_p=0, is_causal=False, *, attn_mask=None, scale=None)``
    -> ``(out, logsumexp)``."""
    attention = _attention_module()
    mesh, (query, key, value, *rest), options = _local(args, kwargs)
    dropout_p, is_causal = (rest + [0.0, False][len(rest) :])[:2]
    if options.get("attn_mask") is not None:
        raise NotImplementedError("context parallel attention on CPU takes no attn_mask")
    out, logsumexp = attention._templated_ring_attention(
        mesh.get_group(),
        SEQUENCE_DIM,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        query=query,
        key=key,
        value=value,
        is_causal=is_causal,
        dropout_p=dropout_p,
        scale=options.get("scale"),
    )[:2]
    return _sharded(mesh, (out, logsumexp))


def _backward(op_call: Any, args: tuple, kwargs: dict) -> tuple[DTensor, ...]:
    """``(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *,
    attn_mask=None, scale=None)`` -> the gradients of query, key and value."""
    attention = _attention_module()
    mesh, (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal), options = _local(
        args, kwargs
    )
    grads = attention._templated_ring_attention_backward(
        mesh.get_group(),
        SEQUENCE_DIM,
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        grad_out=grad_out,
        grad_out_name="grad_out",
        query=query,
        key=key,
        value=value,
        out=out,
        logsumexp=logsumexp,
        is_causal=is_causal,
        dropout_p=dropout_p,
        scale=options.get("scale"),
    )[:3]
    return _sharded(mesh, grads)


def _values_as_wide_as_keys(sdpa: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``sdpa`` that pads sequence-sharded values narrower than the keys with zeros (their
    output columns are zero and are cut off), so that the CPU kernel can take them."""

    @functools.wraps(sdpa)
    def attention(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        width = value.shape[-1]
        if not isinstance(value, DTensor) or width == key.shape[-1]:
            return sdpa(query, key, value, *args, **kwargs)
        padded = F.pad(value.to_local(), (0, key.shape[-1] - width))
        value = DTensor.from_local(padded, value.device_mesh, value.placements, run_check=False)
        out = sdpa(query, key, value, *args, **kwargs)
        narrowed = out.to_local()[..., :width]
        return DTensor.from_local(narrowed, out.device_mesh, out.placements, run_check=False)

    return attention


def ring_attention_for_cpu_sdpa() -> None:
    """Register the CPU kernel's handlers where torch's context parallel takes its
    handlers from when it is enabled (``custom_ops``), and give SDPA the values' padding
    (torch's context parallel wraps whatever ``F.scaled_dot_product_attention`` is)."""
    handlers = _attention_module().custom_ops
    handlers[aten._scaled_dot_product_flash_attention_for_cpu.default] = _forward
    handlers[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = _backward
    F.scaled_dot_product_attention = _values_as_wide_as_keys(F.scaled_dot_product_attention)
