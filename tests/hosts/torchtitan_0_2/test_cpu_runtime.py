import pytest
import torch

from titan_objectives.hosts.torchtitan_0_2.runtime.moe_permute import generate_permute_indices


def test_torchtitan_runs_on_cpu():
    import torchtitan.tools.utils as titan_utils

    assert titan_utils.device_type == "cpu"
    assert titan_utils.device_module.current_device() == 0
    stats = titan_utils.device_module.memory_stats()
    assert stats["reserved_bytes.all.peak"] > 10 * 2**20
    # torch itself is untouched.
    assert torch._utils._get_available_device_type() is None
    assert not hasattr(torch.cpu, "memory_stats")


def reference_permute(counts, experts_per_rank, num_ranks, max_len, alignment):
    """The loop the Triton kernel parallelizes, written out."""
    counts = counts.tolist()
    starts = [sum(counts[:i]) for i in range(len(counts))]
    sizes = []
    for e in range(experts_per_rank):
        total = max(sum(counts[r * experts_per_rank + e] for r in range(num_ranks)), alignment)
        sizes.append((total + alignment - 1) // alignment * alignment)
    out = [-1] * max_len
    write = 0
    for e in range(experts_per_rank):
        position = write
        for r in range(num_ranks):
            i = r * experts_per_rank + e
            for j in range(counts[i]):
                if position + j < max_len:
                    out[position + j] = starts[i] + j
            position += counts[i]
        write += sizes[e]
    offsets = [sum(sizes[: e + 1]) for e in range(experts_per_rank)]
    return out, sizes, offsets


@pytest.mark.parametrize(
    ("experts", "ranks", "alignment", "max_len"), [(4, 1, 8, 96), (3, 2, 4, 64), (2, 3, 16, 40)]
)
def test_moe_permute_matches_reference(experts, ranks, alignment, max_len):
    torch.manual_seed(experts * 10 + ranks)
    counts = torch.randint(0, 7, (experts * ranks,))
    counts[1] = 0  # an expert group with no tokens
    permuted, sizes, offsets = generate_permute_indices(counts, experts, ranks, max_len, alignment)
    expected, expected_sizes, expected_offsets = reference_permute(
        counts, experts, ranks, max_len, alignment
    )
    assert permuted.tolist() == expected
    assert sizes.tolist() == expected_sizes
    assert offsets.tolist() == expected_offsets
    assert permuted.dtype == sizes.dtype == offsets.dtype == torch.int32
