"""Representation geometry, plain PyTorch."""

from titan_objectives.metrics.geometry import (
    GeometryError,
    effective_rank,
    mean_pairwise_cosine,
    random_pair_cosine,
)

__all__ = ["GeometryError", "effective_rank", "mean_pairwise_cosine", "random_pair_cosine"]
