"""Loss kernels shared by objectives."""

from titan_objectives.losses.linear_cross_entropy import (
    cross_entropy_sum,
    linear_cross_entropy_sum,
)

__all__ = ["cross_entropy_sum", "linear_cross_entropy_sum"]
