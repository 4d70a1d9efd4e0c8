"""The ``titan-objectives describe`` table: what each objective adds to the model."""

from dataclasses import dataclass
from typing import Any

from titan_objectives.stack import ObjectiveStack


@dataclass
class ModelCost:
    """The model's size and training FLOPs per token, as the host's torchtitan counts them."""

    label: str
    """The model, as the host's config names it (``llama3 debugmodel``)."""
    parameters: int
    flops_per_token: int
    seq_len: int
    parallelism: Any
    """The host config's parallelism section."""


# The parallelism keys of both releases' configs, and their short names.
DEGREES = {
    "data_parallel_replicate_degree": "dp_replicate",
    "data_parallel_shard_degree": "dp_shard",
    "tensor_parallel_degree": "tp",
    "context_parallel_degree": "cp",
    "pipeline_parallel_degree": "pp",
    "expert_parallel_degree": "ep",
}


def degrees_of(parallelism: Any) -> str:
    """``dp_replicate 1, dp_shard -1, tp 2, ...`` of the host config's parallelism."""
    return ", ".join(f"{short} {getattr(parallelism, key)}" for key, short in DEGREES.items())


def parallelism_checked(parallelism: Any) -> str:
    """The degrees the checks ran against (``parallelism``: the host's config section)."""
    return f"parallelism checked: {degrees_of(parallelism)} (dp_shard -1: the ranks left over)"


def describe(model: ModelCost, stack: ObjectiveStack) -> str:
    """Each objective's weight, extra parameters and training FLOPs per token, against
    the model's, and the parallelism the stack was checked for."""
    flops = model.flops_per_token
    lines = [
        f"model: {model.label}, {model.parameters:,} parameters, {flops / 1e6:,.1f} MFLOPs per "
        f"token for training (torchtitan's count, seq_len {model.seq_len})",
        f"stack: {' + '.join(stack)}",
        parallelism_checked(model.parallelism),
        "",
        f"{'objective':<10} {'weight':>8} {'extra params':>14} {'extra MFLOPs/token':>20} "
        f"{'overhead':>9}",
    ]
    total_params = total_flops = 0
    for name, objective in stack.objectives().items():
        options = objective.options
        params = sum(p.numel() for p in objective.parameters())
        extra_flops = objective.flops_per_token()
        total_params, total_flops = total_params + params, total_flops + extra_flops
        weight = options.weight if options.schedule == "constant" else f"{options.weight:g}*"
        lines.append(
            f"{name:<10} {weight:>8} {params:>14,} {extra_flops / 1e6:>20,.2f} "
            f"{100 * extra_flops / flops:>8.2f}%"
        )
    lines.append(
        f"{'total':<10} {'':>8} {total_params:>14,} {total_flops / 1e6:>20,.2f} "
        f"{100 * total_flops / flops:>8.2f}%"
    )
    if any(o.schedule != "constant" for o in stack.options().values()):
        lines.append("* weight at step 1; it follows the objective's schedule")
    return "\n".join(lines)
