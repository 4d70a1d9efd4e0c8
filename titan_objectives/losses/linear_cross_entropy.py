"""Cross-entropy from hidden states and the output weight, a chunk of tokens at a time.

The plain path materializes ``[tokens, vocab]`` logits, keeps them (and their fp32 copy)
for backward, then allocates their gradient: at vocab 128k and 16k tokens that is
several GB. Here each chunk's logits live only inside the loop: the forward pass also
computes the chunk's gradients with respect to the hidden states and the weight (the
same three matmuls as the plain path), keeps those, and backward only scales them by the
incoming gradient. The technique of Liger-Kernel's fused linear cross-entropy and Apple's
Cut Cross-Entropy, in plain PyTorch.
"""

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from titan_objectives.objective import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over positions whose label is not ``IGNORE_INDEX``, from fp32
    logits: torchtitan's ``cross_entropy_loss``, so an NTP-only stack gives its numbers.

    Vocabulary-sharded logits (tensor parallel with loss parallel) go through
    ``_vocab_parallel_cross_entropy_sum``."""
    if isinstance(logits, DTensor):
        return _vocab_parallel_cross_entropy_sum(logits, labels)
    return _cross_entropy_sum(logits, labels)


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, -2).float(),
        labels.flatten(),
        reduction="sum",
        ignore_index=IGNORE_INDEX,
    )


@torch.compiler.disable
def _vocab_parallel_cross_entropy_sum(logits: DTensor, labels: torch.Tensor) -> torch.Tensor:
    """CE of vocabulary-sharded logits, inside the caller's ``loss_parallel`` context.
    Kept out of torch.compile: a compiled graph does not see that context and computes a
    wrong loss (torchtitan 0.2.2 with ``compile.components = ["loss"]`` and TP: 13.99
    instead of 8.15 on its debug model). Returns a plain tensor, to add to the other
    objectives' terms."""
    return _cross_entropy_sum(logits, labels).full_tensor()


def _chunk_loss_and_grads(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, with_grads: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss sum of one chunk, and its gradients w.r.t. the chunk's hidden states and the
    weight (fp32), without keeping the chunk's logits."""
    logits = (hidden @ weight.t()).float()
    valid = labels != IGNORE_INDEX
    safe_labels = torch.where(valid, labels, 0)
    log_z = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, safe_labels[:, None]).squeeze(1)
    loss = torch.where(valid, log_z - target_logit, 0.0).sum()
    if not with_grads:
        return loss, None, None
    # d loss / d logits = softmax - onehot(label), zero for ignored positions; computed
    # in the logits' own buffer so a chunk costs one [chunk, vocab] fp32 tensor.
    grad_logits = logits.sub_(log_z[:, None]).exp_()
    grad_logits.scatter_add_(1, safe_labels[:, None], torch.full_like(target_logit[:, None], -1.0))
    grad_logits = grad_logits.mul_(valid[:, None]).to(hidden.dtype)
    grad_hidden = grad_logits @ weight
    grad_weight = (grad_logits.t() @ hidden).float()
    return loss, grad_hidden, grad_weight


_compiled_chunk: dict[bool, object] = {}


def _chunk_function(on_gpu: bool):
    """The per-chunk step, compiled on GPU (one fused kernel for softmax and its gradient),
    eager elsewhere (CPU builds compile slowly and gain little)."""
    if on_gpu not in _compiled_chunk:
        _compiled_chunk[on_gpu] = (
            torch.compile(_chunk_loss_and_grads, dynamic=True) if on_gpu else _chunk_loss_and_grads
        )
    return _compiled_chunk[on_gpu]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, with_grads):
        chunk_step = _chunk_function(hidden.is_cuda)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if with_grads
            else None
        )
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            chunk_loss, chunk_grad_hidden, chunk_grad_weight = chunk_step(
                hidden[start:end], weight, labels[start:end], with_grads
            )
            loss += chunk_loss
            if with_grads:
                grad_hidden[start:end] = chunk_grad_hidden
                grad_weight += chunk_grad_weight
        if with_grads:
            # Accumulated in fp32, kept in the weight's dtype, as autograd would return it.
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place, as Liger-Kernel does: the saved gradients are used once (a
        # second backward through this graph would need retain_graph, which losses never do).
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)),
            grad_weight.mul_(grad_loss.to(grad_weight.dtype)),
            None,
            None,
            None,
        )


@torch.compiler.disable
def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``cross_entropy_sum(hidden @ weight.T, labels)`` in chunks of ``chunk_size`` tokens.

    ``hidden``: ``[..., dim]``; ``weight``: ``[vocab, dim]``; ``labels``: ``[...]``.
    Peak extra memory is one chunk's logits plus a weight-sized fp32 gradient, instead of
    the full logits, their fp32 copy and their gradient. (Kept out of ``torch.compile``'s
    graph: the chunk loop would unroll.)
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk_size, with_grads
    )
