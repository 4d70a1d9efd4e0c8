"""Geometry metrics against numpy references and known cases."""

import numpy as np
import pytest
import torch

from titan_objectives.metrics import (
    GeometryError,
    effective_rank,
    mean_pairwise_cosine,
    random_pair_cosine,
)


def numpy_effective_rank(x: np.ndarray) -> float:
    centred = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def numpy_mean_cosine(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = u @ u.T
    n = len(x)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def test_effective_rank_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)) @ np.diag(np.linspace(0.1, 3, 20))
    assert effective_rank(torch.tensor(x)).item() == pytest.approx(
        numpy_effective_rank(x), rel=1e-5
    )


def test_isotropic_gaussian_has_high_rank_and_no_cosine():
    torch.manual_seed(0)
    x = torch.randn(4000, 64)
    assert effective_rank(x).item() > 0.9 * 64
    assert abs(mean_pairwise_cosine(x).item()) < 0.01
    ids = torch.arange(4000) // 10
    cos = random_pair_cosine(x, ids, 20000, torch.Generator().manual_seed(0))
    assert abs(cos.item()) < 0.02


def test_rank_one_data():
    torch.manual_seed(0)
    direction = torch.randn(32)
    scales = torch.rand(500) + 0.5
    x = scales[:, None] * direction  # all along one direction, same sign
    assert effective_rank(x).item() == pytest.approx(1.0, abs=1e-3)
    assert mean_pairwise_cosine(x).item() == pytest.approx(1.0, abs=1e-5)
    signs = torch.where(torch.arange(500) % 2 == 0, 1.0, -1.0)
    flipped = (signs * scales)[:, None] * direction  # +-1 cosines, half and half
    assert effective_rank(flipped).item() == pytest.approx(1.0, abs=1e-3)
    ids = torch.arange(500)
    cos = random_pair_cosine(flipped, ids, 5000, torch.Generator().manual_seed(1))
    assert abs(cos.item()) < 0.05  # +1 and -1 pairs equally likely


def test_mean_cosine_closed_form_matches_all_pairs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)) + 0.7  # anisotropic: a shared offset
    assert mean_pairwise_cosine(torch.tensor(x)).item() == pytest.approx(
        numpy_mean_cosine(x), rel=1e-5
    )


def test_random_pairs_skip_same_sequence_pairs():
    # Two sequences: within each all vectors identical, across them orthogonal.
    x = torch.cat(
        [torch.tensor([[1.0, 0.0]]).repeat(50, 1), torch.tensor([[0.0, 1.0]]).repeat(50, 1)]
    )
    ids = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    cos = random_pair_cosine(x, ids, 1000, torch.Generator().manual_seed(0))
    assert cos.item() == pytest.approx(0.0, abs=1e-6)  # same-sequence pairs (cos 1) excluded


def test_too_few_tokens_is_an_error_not_a_number():
    with pytest.raises(GeometryError, match="needs at least as many tokens as dimensions; got 10"):
        effective_rank(torch.randn(10, 64))
    with pytest.raises(GeometryError, match="at least 2 sequences"):
        random_pair_cosine(torch.randn(10, 4), torch.zeros(10).long(), 5, torch.Generator())
