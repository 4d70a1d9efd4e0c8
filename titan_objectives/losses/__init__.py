"""Loss kernels shared by objectives."""

from titan_objectives.losses.cross_entropy_options import CrossEntropyBackend, CrossEntropyOptions
from titan_objectives.losses.linear_cross_entropy import (
    cross_entropy_sum,
    linear_cross_entropy_sum,
    linear_sparse_cross_entropy_sum,
    torch_has_linear_cross_entropy,
)

__all__ = [
    "CrossEntropyBackend",
    "CrossEntropyOptions",
    "cross_entropy_sum",
    "linear_cross_entropy_sum",
    "linear_sparse_cross_entropy_sum",
    "torch_has_linear_cross_entropy",
]
