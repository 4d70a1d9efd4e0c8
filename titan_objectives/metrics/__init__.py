"""Representation geometry, plain PyTorch."""

from titan_objectives.metrics.geometry import (
    CovarianceMoments,
    GeometryError,
    effective_rank,
    effective_rank_sv,
    mean_pairwise_cosine,
    random_pair_cosine,
)

__all__ = [
    "CovarianceMoments",
    "GeometryError",
    "effective_rank",
    "effective_rank_sv",
    "mean_pairwise_cosine",
    "random_pair_cosine",
]
