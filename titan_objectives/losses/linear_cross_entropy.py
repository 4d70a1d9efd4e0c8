"""Cross-entropy of the LM head: from its logits, or from hidden states and its weight
without ever holding ``[tokens, vocab]`` logits.

The plain path materializes the logits, keeps them (and their fp32 copy) for backward,
then allocates their gradient: at vocab 128k and 16k tokens that is several GB. Two
memory-efficient backends compute the loss a chunk of tokens at a time instead:

- ``torch``: PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13),
  with ``LinearCrossEntropyOptions(batch_chunk_size=chunk_size)``;
- ``chunked``: ours, for older torch and for a head split over the vocabulary (tensor
  parallel). Each chunk's forward also computes the chunk's gradients with respect to the
  hidden states and the weight (the same three matmuls as the plain path) and keeps only
  those; backward scales them by the incoming gradient (the technique of Liger-Kernel's
  fused linear cross-entropy and Apple's Cut Cross-Entropy). With the head's rows split
  over ranks, each rank computes its rows' logits for every token of a chunk and the
  ranks combine the log-sum-exp (a max, a sum and the target logit, all-reduced per
  chunk): no rank ever holds ``[tokens, vocab / tp]`` logits.
"""

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from titan_objectives.collectives import all_reduce
from titan_objectives.objective import IGNORE_INDEX
from titan_objectives.sequence import UNSHARDED, SequenceShards
from titan_objectives.vocabulary import logsumexp_over_ranks, shard_range


def torch_has_linear_cross_entropy() -> bool:
    """Whether the installed torch ships ``F.linear_cross_entropy`` (2.13 and later)."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


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
    wrong loss. Returns a plain tensor, to add to the other objectives' terms."""
    return _cross_entropy_sum(logits, labels).full_tensor()


def _chunk_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    with_grads: bool,
    mesh: DeviceMesh | None = None,
    first_row: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss sum of one chunk, and its gradients w.r.t. the chunk's hidden states and the
    weight (fp32), without keeping the chunk's logits. The loss of a token is the
    cross-entropy ``logsumexp(z) - sum_k q_k z[id_k]`` against a target distribution
    given sparsely (``target_ids``, ``target_probs``: ``[chunk, K]``, each row summing to
    1, or to 0 for a token that scores nothing). ``weight`` holds vocabulary rows
    ``first_row..``; with ``mesh`` the other rows are on the other ranks of it (the
    hidden-state gradient is then this rank's share of the sum)."""
    logits = (hidden @ weight.t()).float()
    scored = target_probs.sum(dim=-1) > 0
    here = (target_probs > 0) & (target_ids >= first_row)
    here &= target_ids < first_row + weight.shape[0]
    rows = torch.where(here, target_ids - first_row, 0)
    weights = torch.where(here, target_probs, 0.0).float()
    target_term = (logits.gather(1, rows) * weights).sum(dim=-1)
    if mesh is None:
        log_z = torch.logsumexp(logits, dim=-1)
    else:
        log_z = logsumexp_over_ranks(logits, mesh)
        target_term = all_reduce(target_term, "sum", mesh)
    loss = torch.where(scored, log_z - target_term, 0.0).sum()
    if not with_grads:
        return loss, None, None
    # d loss / d logits = softmax - q, zero for tokens that score nothing; computed in the
    # logits' own buffer so a chunk costs one [chunk, rows] fp32 tensor.
    grad_logits = logits.sub_(log_z[:, None]).exp_().mul_(scored[:, None])
    grad_logits.scatter_add_(1, rows, -weights)
    grad_logits = grad_logits.to(hidden.dtype)
    grad_hidden = grad_logits @ weight
    grad_weight = (grad_logits.t() @ hidden).float()
    return loss, grad_hidden, grad_weight


_compiled_chunk: dict[bool, object] = {}


def _chunk_function(on_gpu: bool, split: bool):
    """The per-chunk step, compiled on GPU (one fused kernel for softmax and its gradient),
    eager elsewhere (CPU builds compile slowly and gain little) and with a split head."""
    if not on_gpu or split:
        return _chunk_loss_and_grads
    if True not in _compiled_chunk:
        _compiled_chunk[True] = torch.compile(_chunk_loss_and_grads, dynamic=True)
    return _compiled_chunk[True]


class _LinearSparseCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, target_ids, target_probs, chunk_size, with_grads, mesh, first_row
    ):
        chunk_step = _chunk_function(hidden.is_cuda, mesh is not None)
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
                hidden[start:end],
                weight,
                target_ids[start:end],
                target_probs[start:end],
                with_grads,
                mesh,
                first_row,
            )
            loss += chunk_loss
            if with_grads:
                grad_hidden[start:end] = chunk_grad_hidden
                grad_weight += chunk_grad_weight
        if with_grads:
            # Accumulated in fp32, kept in the weight's dtype, as autograd would return it.
            grad_weight = grad_weight.to(weight.dtype)
        # Kept on ctx rather than saved: the first backward scales them in place.
        ctx.grads, ctx.scaled = (grad_hidden, grad_weight), False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place, as Liger-Kernel does, once: a zero-bubble pipeline schedule
        # runs this node's backward a second time (its weight pass replays the graph with
        # the same output gradient), which gets the gradients already scaled.
        grad_hidden, grad_weight = ctx.grads
        if not ctx.scaled:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
            ctx.scaled = True
        return grad_hidden, grad_weight, None, None, None, None, None, None


@torch.compiler.disable
def linear_sparse_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    chunk_size: int,
    sequence: SequenceShards = UNSHARDED,
) -> torch.Tensor:
    """``sum_t [logsumexp(z_t) - sum_k q_{t,k} z_t[id_{t,k}]]`` with ``z_t = weight @ h_t``:
    the cross-entropy against target distributions that each put weight on at most K
    tokens, ``chunk_size`` tokens at a time, never holding ``[tokens, vocab]`` logits or
    targets (ListNet with sparse targets; the cross-entropy of labels is K = 1).

    ``hidden``: ``[..., dim]`` (under sequence parallelism this rank's positions, with
    ``sequence`` saying which); ``weight``: ``[vocab, dim]``, or a DTensor split over the
    vocabulary; ``target_ids``, ``target_probs``: ``[..., K]`` over the *whole* sequence,
    rows summing to 1 or 0 (a token that scores nothing). Kept out of ``torch.compile``'s
    graph: the chunk loop would unroll.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    # The positions this rank's tensor-parallel group holds (all, without context parallel).
    target_ids, target_probs = sequence.in_group(target_ids), sequence.in_group(target_probs)
    mesh, first_row = None, 0
    if isinstance(weight, DTensor):
        if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
            raise ValueError(
                f"the head's weight is a DTensor placed {weight.placements} on a "
                f"{weight.device_mesh.ndim}-D mesh; expected rows split over the vocabulary "
                "(Shard(0)) on one tensor-parallel dimension"
            )
        mesh = weight.device_mesh
        first_row, _ = shard_range(weight.shape[0], mesh)
        # Every token against this rank's rows: the whole sequence, whose gradient here is
        # this rank's share (the gather's backward adds the shares up, shard by shard).
        hidden = sequence.all_positions(hidden)
        weight = weight.to_local()
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    k = target_ids.shape[-1]
    return _LinearSparseCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        target_ids.reshape(-1, k),
        target_probs.reshape(-1, k),
        chunk_size,
        with_grads,
        mesh,
        first_row,
    )


def _torch_linear_cross_entropy(hidden, weight, labels, chunk_size) -> torch.Tensor:
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size)
    # Per token, summed in fp32: the kernel returns the input's dtype, and a bf16 sum over
    # thousands of tokens keeps 3 significant digits (0.4% off at 37 tokens already).
    per_token = F.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
        options=options,
    )
    return per_token.float().sum()


@torch.compiler.disable
def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    backend: str = "auto",
    sequence: SequenceShards = UNSHARDED,
) -> torch.Tensor:
    """``cross_entropy_sum(hidden @ weight.T, labels)``, ``chunk_size`` tokens at a time.

    ``hidden``: ``[..., dim]`` (under sequence parallelism this rank's positions, with
    ``sequence`` saying which); ``weight``: ``[vocab, dim]``, or a DTensor split over the
    vocabulary (tensor parallel); ``labels``: ``[...]``, the whole sequence. ``backend``:
    ``"torch"``, ``"chunked"`` or ``"auto"`` (PyTorch's when the installed torch has it
    and the head is whole, else ours). Peak extra memory is one chunk's logits plus a
    weight-sized fp32 gradient. (Kept out of ``torch.compile``'s graph: PyTorch's kernel
    falls back to eager there, and our chunk loop would unroll.)
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    split = isinstance(weight, DTensor)
    if backend == "torch" and split:
        raise ValueError("PyTorch's linear_cross_entropy needs the head's whole vocabulary")
    if backend == "torch" or (backend == "auto" and not split and torch_has_linear_cross_entropy()):
        return _torch_linear_cross_entropy(hidden, weight, sequence.in_group(labels), chunk_size)
    valid = labels != IGNORE_INDEX
    target_ids = torch.where(valid, labels, 0)[..., None]
    return linear_sparse_cross_entropy_sum(
        hidden, weight, target_ids, valid[..., None].float(), chunk_size, sequence
    )
