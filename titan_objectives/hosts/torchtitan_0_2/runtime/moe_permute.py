"""Plain-PyTorch ``generate_permute_indices``, for torchtitan's MoE on CPU (no triton).

Same contract as ``torchtitan.models.moe.kernels.generate_permute_indices``: group the
tokens that ``num_ranks`` ranks send to each of this rank's experts, expert by expert and
rank by rank within an expert, padding every expert's group to ``alignment``.
"""

import torch


def generate_permute_indices(
    tokens_per_expert_group: torch.Tensor,
    experts_per_rank: int,
    num_ranks: int,
    max_len: int,
    alignment: int,
    use_cpu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    del use_cpu  # always plain PyTorch
    counts = tokens_per_expert_group
    start_index = torch.cumsum(counts, 0) - counts

    total_per_expert = counts.view(num_ranks, -1).sum(0).clamp_min(alignment)
    m_sizes = ((total_per_expert + alignment - 1) // alignment * alignment).to(torch.int32)
    m_offsets = torch.cumsum(m_sizes, 0)
    write_offsets = m_offsets - m_sizes

    # Segments in write order: expert-major, then rank.
    lengths = counts.view(num_ranks, experts_per_rank).t()
    sources = start_index.view(num_ranks, experts_per_rank).t().reshape(-1)
    destinations = (write_offsets[:, None] + torch.cumsum(lengths, 1) - lengths).reshape(-1)
    lengths = lengths.reshape(-1)

    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=counts.device), lengths)
    segment_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    within = torch.arange(segment.numel(), device=counts.device) - segment_start
    destination = destinations[segment] + within
    keep = destination < max_len

    permuted = torch.full((max_len,), -1, dtype=torch.int32, device=counts.device)
    permuted[destination[keep]] = (sources[segment] + within)[keep].to(torch.int32)
    return permuted, m_sizes, m_offsets.to(torch.int32)
